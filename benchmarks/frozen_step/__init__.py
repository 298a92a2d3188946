"""A frozen copy of the host-planned CPU decode step as it was before the page table (issue 27): the runtime and
its step, unchanged but for imports, so ``benchmarks.decode_speed --frozen-step`` can time today's ``cpu`` backend
against it in one process. Deleted once the comparison is committed."""
