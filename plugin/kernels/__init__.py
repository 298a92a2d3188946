"""Kernels with the same API as the reference attention (Triton, FlashInfer)."""
