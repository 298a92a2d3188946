"""Kernels behind the registered attention backends, each tested against the reference attention: the Triton
decode kernel (``triton_decode``, CUDA; the interpreter and AOT PTX on the CPU) and the C kernel of the CPU decode
step (``cpu_decode`` + ``cpu_paged_decode.c``)."""

#: log2(e): the kernels' softmax is base 2, so their score scale is ``sm_scale · LOG2_E``.
LOG2_E = 1.4426950408889634


def qk_scale_bits(sm_scale: float) -> int:
    """The int32 carrying the bits of the fp32 ``sm_scale · log2 e``: how the TensorRT plugin kernel takes its scale
    (TensorRT passes an AOT kernel int32 scalars only)."""
    import numpy as np

    return int(np.array([sm_scale * LOG2_E], dtype=np.float32).view(np.int32)[0])
