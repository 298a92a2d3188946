"""sparsemm-export: ONNX engine folders with the budget plan baked in, and their torch-free onnxruntime runner.

Export side (torch): ``build`` (``export_model``, the atomic folder), ``trace_graphs`` / ``graphs`` (the vision,
prefill-with-selection and decode modules), ``selection`` (SnapKV in graph form), ``decode_attention`` (the custom
node and its standard-ops twin), ``onnx_io`` (tracing, node attributes, external data), ``checks``, ``describe``,
``torch_reference`` (the torch path an engine must equal), ``cli`` (``sparsemm-export``).

Run side (torch-free): ``runner`` (``OnnxEngine``), ``manifest`` (the sha256 seal), ``preprocess`` (image patches,
M-RoPE indices, chat prompt), ``engine_pool`` (the page table over numpy pages), ``ragged_numpy`` + ``ort_session`` (the
``SparseMMRaggedDecode`` op for onnxruntime), ``plugin_rules`` (TensorRT parser rules, static).

Families (config ``model_type``, ``preprocess.FAMILIES``): ``qwen2_vl`` and ``qwen2_5_vl`` (Qwen2-VL patches of one
fixed image size, M-RoPE positions; the 2.5 vision tower's window attention traced for that size), ``llava``
(LLaVA-1.5: any image at the CLIP crop size, one-axis positions) and ``llava_next`` (anyres tiles, unpadding and
image-newline embeddings for one fixed image size; ``preprocess_llava``).
"""
