"""Kernels behind the registered attention backends, each tested against the reference attention: the Triton
decode kernel (``triton_decode``, CUDA; the interpreter and AOT PTX on the CPU) and the C kernel of the CPU decode
step (``cpu_decode`` + ``cpu_paged_decode.c``)."""
