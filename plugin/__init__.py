"""The SparseMM policy and ragged-KV attention, engine-agnostic: the plan file and its knobs, budget methods and the
one plan path, selection, the head-paged pool, the runtime (rows, the CPU decode step), the attention contract with
its registered backends and kernels. Adapters (transformers, SGLang, ONNX) build on this package."""
