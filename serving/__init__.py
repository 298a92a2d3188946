"""Engine adapters: transformers generate(), SGLang plugin, load-test client."""
