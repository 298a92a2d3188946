"""The CPU decode kernel (``cpu_paged_decode.c``): built on first use with the system C compiler, called via ctypes.

Why C: on a CPU, a decode step over the few tokens a compressed head keeps is dominated by per-op overhead and by
reading the pool. The kernel does one layer's write + attention in one call, reading each (request, KV head)'s own
pages where they are: no gather into a workspace, no padding of a layer's heads to the longest, no mask
(the ``cpu`` attention backend; the torch path stays the fallback and the reference it is tested against).

The library is compiled with ``cc -O3 -march=native`` (plain C, no torch headers: well under a second) into a
per-user cache, ``$SPARSEMM_CACHE_DIR`` or ``$XDG_CACHE_HOME/sparsemm`` (default ``~/.cache/sparsemm``), under a
key of the source, flags, compiler and CPU, and written by rename so concurrent processes never see half a file.
Whether it is used is the attention backend's choice (``SPARSEMM_ATTENTION_BACKEND=cpu``, or ``auto`` with
single-threaded torch). Where no compiler works ``load()`` returns None and logs why once (``build_error()``), and
``auto`` takes ``cpu-sdpa``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("sparsemm")

SOURCE = Path(__file__).with_name("cpu_paged_decode.c")
ABI = 3  # what ``sparsemm_cpu_decode_abi()`` must return
#: Vectorising the dot products needs reassociation; none of these flags changes how infinities or NaNs behave.
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
NATIVE = ("-march=native",)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURE = [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, _PTR, _PTR]
_POOL_TAIL_SIGNATURE = [_PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64,
                        _I64, _I64, ctypes.c_float, _PTR, _PTR]  # fmt: skip


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("SPARSEMM_CACHE_DIR"):
        return Path(os.environ["SPARSEMM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsemm"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on (a library built for another CPU could fault on this one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))}))
    except OSError:
        return platform.processor() or platform.machine()


class PagedDecodeKernel:
    """The loaded library: ``run`` is ``sparsemm_paged_decode_f32``, ``pool_tail`` is
    ``sparsemm_pool_tail_decode_f32`` and ``advance`` is ``sparsemm_advance`` (arguments: see the C source), ctypes
    functions called directly (no Python frame beyond the call)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.sparsemm_cpu_decode_abi.restype = _I64
        if lib.sparsemm_cpu_decode_abi() != ABI:
            raise OSError(f"{path} has ABI {lib.sparsemm_cpu_decode_abi()}, expected {ABI}")
        fn = lib.sparsemm_paged_decode_f32
        fn.restype = None
        fn.argtypes = _SIGNATURE
        advance = lib.sparsemm_advance
        advance.restype = None
        advance.argtypes = [_PTR, _I64, _PTR, _I64]
        pool_tail = lib.sparsemm_pool_tail_decode_f32
        pool_tail.restype = None
        pool_tail.argtypes = _POOL_TAIL_SIGNATURE
        self._lib, self.run, self.advance, self.pool_tail = lib, fn, advance, pool_tail


def build(directory: Path | None = None) -> Path:
    """Compile the kernel (or find it already built) and return the library's path; raises ``RuntimeError`` with
    the compiler's message when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang on PATH, or $CC) to build the CPU decode kernel")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    errors = []
    for flags in (FLAGS + NATIVE, FLAGS):  # -march=native where the compiler knows it
        parts = [source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()]
        key = hashlib.sha256(b"\0".join(parts))
        target = (directory or cache_dir()) / "kernels" / f"cpu_paged_decode-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            started = time.perf_counter()
            done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)
                logger.info("sparsemm: built the CPU decode kernel (%.1f s): %s", time.perf_counter() - started, target)
                return target
            errors.append(f"{cc} {' '.join(flags)}: {done.stderr.strip()[-600:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("could not build the CPU decode kernel:\n" + "\n".join(errors))


_BUILD_ERROR: list[str] = []


@functools.lru_cache(maxsize=1)
def load() -> PagedDecodeKernel | None:
    """The kernel, built if needed; None (logged once, ``build_error()``) when it cannot be built."""
    _BUILD_ERROR.clear()
    try:
        return PagedDecodeKernel(build())
    except (RuntimeError, OSError) as err:
        logger.warning("sparsemm: CPU decode kernel unavailable, using the torch path (%s)", err)
        _BUILD_ERROR.append(str(err).splitlines()[0])
        return None


def build_error() -> str | None:
    """Why the last ``load()`` found no kernel (None if it found one or never ran)."""
    return _BUILD_ERROR[0] if _BUILD_ERROR else None
