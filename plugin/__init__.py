"""The SparseMM policy and ragged-KV attention, engine-agnostic: budgets, selection, the head-paged pool,
reference attention and kernels. Adapters (transformers, SGLang, ONNX) build on this package."""
