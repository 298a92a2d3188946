"""sparsemm: SparseMM head-sparse KV caching for multimodal LLMs."""

__version__ = "0.1.0"
