"""sparsemm-export: ONNX engine folders and their onnxruntime runner."""
