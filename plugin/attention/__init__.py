"""Ragged attention over the head pool: the one contract every engine and kernel implements.

**The attention contract** (DESIGN §2 points here; SGLang, ONNX, TensorRT and every kernel follow it)

*Sequences.* A request lives in a **row** ``r`` of persistent per-layer tables. Each (row, KV head ``h``) is one
sequence ``s = r·Hkv + h`` with its own length; its ``G = Hq / Hkv`` query heads read it (query head
``hq = h·G + g``, the grouping of transformers' ``repeat_kv``). One call attends one layer for a batch of ``B``
rows (``rows[b]`` is the row of batch entry ``b``).

*Canonical metadata* (int32, device, fixed addresses while rows decode):

* ``tables [R, Hkv, W]`` page ids: token ``j`` of sequence ``(r, h)`` is slot ``j % P`` of page
  ``tables[r, h, j // P]``. Columns at or past ``ceil(lens[r, h] / P)`` are not read (backends must not
  dereference them).
* ``lens [R, Hkv]`` tokens held in the pool per sequence.
* ``kv_skip [R, Hkv]`` (optional, 0 when absent): the first ``kv_skip`` pool tokens are not attended. Always 0
  today; it is the hook for sliding-window layers later, so adding them does not change this contract.
* ``rows [B]`` the rows of this call.

Backends that want CSR (FlashInfer's ``indptr / indices / last_page_len``) derive it inside their ``plan()``
(``csr_from_tables`` does it for the host).

*Pool storage*: ``k_pages, v_pages [N, P, D]`` in the storage dtype (fp32, fp16 or bf16), shared by every layer
and row; the last page ``N − 1`` is the **null page**, all zeros and never assigned.

*The one primitive is pool ⊕ tail*: queries ``q [B, Hq, Lq, D]`` (``Lq ≥ 1``) attend over their sequence's pool
tokens ``[kv_skip, lens)`` followed by a **tail** of ``tail_len[b]`` tokens stored elsewhere:
``k_buf, v_buf [S, Hkv, D]`` (any token buffer: SGLang's token pool, or the new tokens themselves) and
``tail_loc [B, T] int32``, where tail token ``t`` of entry ``b`` is ``k_buf[tail_loc[b, t]]``. A dense tail
is ``tail_loc = arange``. Plain paged attention is the empty-tail case.

*Causality*: the queries are the **last** ``Lq`` positions of the concatenation pool ⊕ tail. With
``n = lens[r, h] + tail_len[b]``, query ``i`` sits at position ``n − Lq + i`` and sees every position up to its
own. So with ``tail_len ≥ Lq`` (decode with the new token in the tail, an extend over new tokens) every pool
token is visible and the tail is causal; with an empty tail the causal part falls inside the pool (the new
tokens were appended first). A (query, head) that sees no key outputs zeros.

*Who appends*: the caller, after the step. For SGLang the tail is the window + generated tokens in its token
pool; for ONNX / TensorRT it is the one new token (``tail_len = 1``), which the runner appends to the pool next.

*Numerics*: scores and softmax in fp32 (fp64 for fp64 inputs) whatever the storage dtype; the output has
``q``'s dtype. Against a float64 reference, ‖out − ref‖/‖ref‖ stays within DESIGN §3: fp32 ≤ 1e-5,
fp16 ≤ 5e-3, bf16 ≤ 2e-2. Values at slots a query may not see are selected away, never multiplied by a zero
weight, so NaN garbage in free memory cannot reach an output.

*Exported graphs* name this node ``SparseMMRaggedDecode`` (domain ``ai.onnx.contrib``, attributes
``plugin_namespace = "sparsemm"``, ``plugin_version = "1"``), the name a TensorRT plugin binds to.

**Backends** register a factory with ``register_backend``. ``plan(shape)`` runs on the host from host integers
only (never reading a device tensor: it may run outside a CUDA graph, ahead of the step); ``run(plan, ...)``
runs on the device and issues no host synchronisation. ``get_backend("auto")`` considers only backends for the
tensors' device (never an interpreter backend), self-checks a candidate against ``"torch"`` once and logs its
choice once; ``SPARSEMM_ATTENTION_BACKEND=auto|cpu|cpu-sdpa|torch|triton|...`` is the one switch that forces one.

**The step level.** A runtime's decode step (one new token per (row, KV head) at every layer: write it, then attend
over the pool with it) may be planned once per step and run per layer. A backend that wants this provides
``decode_planner(runtime) -> DecodePlanner``; its ``begin(batch)`` plans from the runtime's page table
(``runtime.table``, read-only views; lengths advance only through ``table.advance``) and returns a
``DecodeStep`` whose ``attend(layer, q, k_new, v_new, scale)`` runs one layer. Backends without it inherit
``StepLevelDefault``'s: ``append`` + ``attend`` per layer (``LayerwiseDecoder``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sparsemm.errors import InternalError, SparseMMError

logger = logging.getLogger("sparsemm")

#: Op name, domain and plugin attributes of the ragged-attention node in exported graphs.
OP_NAME = "SparseMMRaggedDecode"
OP_DOMAIN = "ai.onnx.contrib"
PLUGIN_NAMESPACE = "sparsemm"
PLUGIN_VERSION = "1"
#: Upper bounds of ‖out − ref‖/‖ref‖ against a float64 reference (DESIGN §3).
REL_ERR_BOUND = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
BACKEND_ENV = "SPARSEMM_ATTENTION_BACKEND"
#: The retired second switch (the C kernel is now the ``cpu`` backend, its absence ``cpu-sdpa``): refused when set.
RETIRED_KERNEL_ENV = "SPARSEMM_CPU_KERNEL"


@dataclass(frozen=True)
class RaggedShape:
    """Host-side geometry of one layer's call: everything ``plan()`` may know.

    ``max_pages`` bounds the pages read per sequence (≥ ``ceil(max lens / P)`` over the call's rows, ≤ ``W``);
    ``max_tail`` is how many columns of ``tail_loc`` to read (0: no tail). ``host_lens [B, Hkv]`` and
    ``host_pages [B, Hkv, max_pages]`` (numpy, optional; every entry a real page or the null page, so all are safe
    to read) are the runtime's host mirror of this call's lengths and table: a backend may plan from them (a CPU
    backend builds its gather indices there, where host arrays cost nothing), never from device tensors;
    ``host_tail_lens [B]`` likewise mirrors the tail's lengths (``Tail.host_length``), when its caller knows them."""

    num_seqs: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    page_size: int
    q_len: int
    max_pages: int
    max_tail: int
    scale: float
    host_lens: Any = field(default=None, compare=False, repr=False)
    host_pages: Any = field(default=None, compare=False, repr=False)
    host_tail_lens: Any = field(default=None, compare=False, repr=False)


@dataclass
class Tail:
    """Tokens after the pool: ``k_buf, v_buf [S, Hkv, D]``, ``loc [B, T] int32``, ``length [B] int32``;
    ``max_length`` (host int, optional) bounds ``length`` so planning needs no device read (default: ``T``);
    ``host_length`` (numpy ``[B]``, optional) is ``length`` on the host, for backends that plan there."""

    k_buf: torch.Tensor
    v_buf: torch.Tensor
    loc: torch.Tensor
    length: torch.Tensor
    max_length: int | None = None
    host_length: Any = None

    @classmethod
    def dense(cls, k: torch.Tensor, v: torch.Tensor) -> Tail:
        """The tail of new tokens held densely as ``k, v [B, Hkv, Lq, D]`` (every entry has ``Lq`` of them)."""
        b, hkv, lq, d = k.shape
        loc = torch.arange(b * lq, device=k.device, dtype=torch.int32).view(b, lq)
        length = torch.full((b,), lq, device=k.device, dtype=torch.int32)
        flat = (k.transpose(1, 2).reshape(b * lq, hkv, d), v.transpose(1, 2).reshape(b * lq, hkv, d))
        return cls(flat[0], flat[1], loc, length, lq)


class AttentionBackend(Protocol):
    """What a registered backend provides (see the module docstring for every argument)."""

    name: str

    def plan(self, shape: RaggedShape) -> Any:
        """Host only: prepare metadata/workspaces for one layer's call; reads no device tensor."""
        ...

    def run(
        self,
        plan: Any,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        *,
        kv_skip: torch.Tensor | None = None,
        tail: Tail | None = None,
    ) -> torch.Tensor:
        """Device: ``q [B, Hq, Lq, D]`` over pool ⊕ tail; returns ``[B, Hq, Lq, D]`` in ``q``'s dtype."""
        ...


class DecodeStep(Protocol):
    """One planned decode step of a batch of rows (``RaggedKV.begin_decode``)."""

    opened_pages: bool  # whether a head started a page this step (the bytes held changed)

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Write the layer's new token (``k_new, v_new [B, Hkv, 1, D]``), attend ``q [B, Hq, 1, D]`` over the pool."""
        ...


class DecodePlanner(Protocol):
    """A backend's step level for one runtime: plans each decode step once, for every layer."""

    def begin(self, batch: Any) -> DecodeStep:
        """Plan one step of ``batch``'s rows (``InternalError`` if a head's reserved pages are full)."""
        ...

    def room_for(self, batch: Any) -> int | None:
        """Steps ``batch`` can still take if known without host work, else None (the runtime counts)."""
        ...


class LayerwiseDecode:
    """The default step: each layer appends its new token, then attends through the runtime's backend."""

    opened_pages = True

    def __init__(self, runtime: Any, batch: Any):
        self.runtime = runtime
        self.batch = batch

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        self.runtime.append(layer, self.batch, k_new, v_new, room_checked=True)
        return self.runtime.attend(layer, self.batch, q, scale)


class LayerwiseDecoder:
    """The default step planner: nothing planned ahead, each layer is ``append`` + ``attend``."""

    def __init__(self, runtime: Any):
        self.runtime = runtime

    def begin(self, batch: Any) -> LayerwiseDecode:
        if self.runtime.room(batch.rows) < 1:
            raise InternalError(f"decode step past the reservation of rows {batch.rows.tolist()}; call reserve_more()")
        return LayerwiseDecode(self.runtime, batch)

    def room_for(self, batch: Any) -> int | None:
        return None


class StepLevelDefault:
    """Base of backends without a step level of their own: they inherit the per-layer default."""

    def decode_planner(self, runtime: Any) -> DecodePlanner:
        return LayerwiseDecoder(runtime)


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend: its factory, the device types it runs on, and how ``auto`` ranks it.

    ``auto_refusal`` (optional) says why ``auto`` should pass the backend over here and now (e.g. several torch
    threads for a single-threaded kernel), or None; a backend named explicitly is used regardless."""

    name: str
    factory: Callable[[], AttentionBackend]
    devices: tuple[str, ...]
    priority: int = 0
    interpreter: bool = False
    auto_refusal: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` took for one (device, dtype, shape) and why each backend ranked above it was not taken."""

    chosen: str
    passed_over: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        why = "; ".join(f"not {name}: {reason}" for name, reason in self.passed_over)
        return f"{self.chosen}" + (f" ({why})" if why else "")


BACKENDS: dict[str, BackendInfo] = {}
_AUTO_CHOICE: dict[tuple, AutoChoice] = {}


def register_backend(
    name: str,
    *,
    devices: tuple[str, ...],
    priority: int = 0,
    interpreter: bool = False,
    auto_refusal: Callable[[], str | None] | None = None,
) -> Callable[[Callable[[], AttentionBackend]], Callable[[], AttentionBackend]]:
    """Decorator registering a backend factory (import heavy dependencies inside the factory).

    ``auto`` tries backends for the tensors' device by descending ``priority``; ``interpreter=True`` marks a
    backend that only runs under an interpreter (never chosen by ``auto``); ``auto_refusal``: see ``BackendInfo``."""

    def wrap(factory: Callable[[], AttentionBackend]) -> Callable[[], AttentionBackend]:
        BACKENDS[name] = BackendInfo(name, factory, tuple(devices), priority, interpreter, auto_refusal)
        _AUTO_CHOICE.clear()
        return factory

    return wrap


def unregister_backend(name: str) -> None:
    """Remove a backend (tests); ``torch`` cannot be removed."""
    if name == "torch":
        raise SparseMMError("the torch reference backend cannot be unregistered")
    BACKENDS.pop(name, None)
    _AUTO_CHOICE.clear()


def get_backend(
    name: str = "auto",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
    page_size: int = 16,
) -> AttentionBackend:
    """The backend ``name``; ``"auto"`` picks the best self-checked one for ``device``/``dtype`` (cached).

    ``SPARSEMM_ATTENTION_BACKEND`` overrides ``"auto"``; a set ``SPARSEMM_CPU_KERNEL`` (retired) is refused."""
    check_retired_switch()
    forced = os.environ.get(BACKEND_ENV)
    if name == "auto" and forced:
        name = forced
    if name != "auto":
        if name not in BACKENDS:
            raise SparseMMError(f"unknown attention backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
        return BACKENDS[name].factory()
    return BACKENDS[auto_choice(device, dtype, head_dim, page_size).chosen].factory()


def check_retired_switch() -> None:
    """Refuse the retired ``SPARSEMM_CPU_KERNEL`` switch, naming what replaced it."""
    value = os.environ.get(RETIRED_KERNEL_ENV)
    if value is not None:
        raise SparseMMError(
            f"{RETIRED_KERNEL_ENV}={value!r} is no longer read: the attention backend is the one switch. Unset it and "
            f"use {BACKEND_ENV}=cpu (the C decode kernel; was {RETIRED_KERNEL_ENV}=1), {BACKEND_ENV}=cpu-sdpa (the "
            f"same planned step without it; was =0) or {BACKEND_ENV}=auto (was auto)"
        )


def auto_choice(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 64, page_size: int = 16
) -> AutoChoice:
    """What ``get_backend("auto")`` takes here, with the reasons (made once per key and torch thread count,
    logged once)."""
    device = torch.device(device)
    key = (device.type, dtype, head_dim, page_size, torch.get_num_threads())
    choice = _AUTO_CHOICE.get(key)
    if choice is None:
        choice = _choose(device, dtype, head_dim, page_size)
        _AUTO_CHOICE[key] = choice
        dt = str(dtype).replace("torch.", "")
        logger.info("sparsemm: attention backend for %s %s: %s", device.type, dt, choice.describe())
    return choice


def auto_choices() -> list[dict[str, Any]]:
    """Every ``"auto"`` choice this process made: device, dtype, the backend taken and why faster ones were not."""
    return [
        {"device": k[0], "dtype": str(k[1]).replace("torch.", ""), "head_dim": k[2], "page_size": k[3],
         "torch_threads": k[4], "chosen": c.chosen, "passed_over": dict(c.passed_over)}
        for k, c in _AUTO_CHOICE.items()
    ]  # fmt: skip


def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, page_size: int) -> AutoChoice:
    passed: list[tuple[str, str]] = []
    for info in sorted((b for b in BACKENDS.values() if b.name != "torch"), key=lambda b: -b.priority):
        if device.type not in info.devices:
            passed.append((info.name, f"runs on {'/'.join(info.devices)}, not {device.type}"))
            continue
        if info.interpreter:
            passed.append((info.name, "runs under an interpreter only"))
            continue
        refusal = info.auto_refusal() if info.auto_refusal is not None else None
        if refusal:
            passed.append((info.name, refusal))
            continue
        try:
            backend = info.factory()
            err = self_check(backend, device=device, dtype=dtype, head_dim=head_dim, page_size=page_size)
        except Exception as exc:  # a candidate that cannot even run is skipped, loudly
            logger.warning("sparsemm: attention backend %r cannot run here (%s); trying the next", info.name, exc)
            passed.append((info.name, str(exc)))
            continue
        bound = REL_ERR_BOUND[dtype]
        if err <= bound:
            return AutoChoice(info.name, tuple(passed))
        reason = f"failed its self-check on {device.type} {str(dtype).replace('torch.', '')} ({err:.2e} > {bound:.0e})"
        logger.warning("sparsemm: attention backend %r %s; not using it", info.name, reason)
        passed.append((info.name, reason))
    return AutoChoice("torch", tuple(passed))


def self_check(
    backend: AttentionBackend,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
    page_size: int = 16,
    seed: int = 0,
) -> float:
    """Relative error of ``backend`` against the float64 torch reference on a small ragged case with a tail: the
    larger of a 2-token causal extend and a decode call planned from the host mirror (``RaggedShape.host_*``).

    The case has an empty head, a one-token head, partial pages, G = 2 and tails padded with freed slots."""
    from sparsemm.plugin.attention.torch_ref import TorchBackend

    gen = torch.Generator().manual_seed(seed)
    rows_n, hkv, g, d, p, lq = 3, 2, 2, head_dim, page_size, 2
    lens = torch.tensor([[0, 1], [2 * p + 3, p], [5, 3 * p]], dtype=torch.int32)
    width = int((lens.max() + p - 1) // p) + 1
    num_pages = rows_n * hkv * width + 1
    k64 = torch.randn(num_pages, p, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(num_pages, p, d, generator=gen, dtype=torch.float64)
    k64[-1] = 0
    v64[-1] = 0
    tables = torch.randperm(num_pages - 1, generator=gen)[: rows_n * hkv * width].view(rows_n, hkv, width)
    tables = tables.to(torch.int32)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32)
    q64 = torch.randn(3, hkv * g, lq, d, generator=gen, dtype=torch.float64)
    tk = torch.randn(12, hkv, d, generator=gen, dtype=torch.float64)
    tv = torch.randn(12, hkv, d, generator=gen, dtype=torch.float64)
    loc = torch.tensor([[4, 7, 1, 0], [2, 3, 0, 0], [9, 10, 11, 5]], dtype=torch.int32)
    tlen = torch.tensor([2, 2, 4], dtype=torch.int32)
    tk[loc[1, 2:].long()] = tv[loc[1, 2:].long()] = float("nan")  # entry 1's padding: freed slots
    host_pages = tables[rows.long()].numpy().copy()
    host_lens = lens[rows.long()].numpy()
    host_pages[np.arange(width)[None, None, :] * p >= host_lens[:, :, None]] = num_pages - 1
    extend = RaggedShape(3, hkv, g, d, p, lq, width, 4, d**-0.5)
    decode = RaggedShape(3, hkv, g, d, p, 1, width, 4, d**-0.5, host_lens, host_pages, tlen.numpy())

    def run(b: AttentionBackend, shape: RaggedShape, cast: torch.dtype, dev: torch.device | str) -> torch.Tensor:
        def t(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=dev, dtype=cast) if x.is_floating_point() else x.to(dev)

        tail = Tail(t(tk), t(tv), t(loc), t(tlen), 4, tlen.numpy())
        q = t(q64[:, :, -shape.q_len :].contiguous())
        return b.run(b.plan(shape), q, t(k64), t(v64), t(tables), t(lens), t(rows), tail=tail).cpu()

    worst = 0.0
    for shape in (extend, decode):
        ref = run(TorchBackend(), shape, torch.float64, "cpu")
        out = run(backend, shape, dtype, device).double()
        if torch.isnan(out).any():
            return float("inf")
        worst = max(worst, float((out - ref).norm() / ref.norm()))
    return worst


def csr_from_tables(
    tables: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indptr [B·Hkv + 1], indices [nnz], last_page_len [B·Hkv])`` int32 for the sequences of ``rows``.

    FlashInfer's paged layout with heads folded into the batch; for a backend's host-side ``plan()`` (it sizes its
    output from the data, so it reads the tensors: call it on host copies)."""
    tab = tables[rows.long()].reshape(-1, tables.shape[-1])
    n = lens[rows.long()].reshape(-1).long()
    pages = (n + page_size - 1) // page_size
    used = torch.arange(tab.shape[1])[None, :] < pages[:, None]
    indptr = torch.zeros(n.numel() + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    last = torch.where(n > 0, (n - 1) % page_size + 1, 0).to(torch.int32)
    return indptr, tab[used].to(torch.int32), last


@register_backend("torch", devices=("cpu", "cuda", "mps", "xpu"), priority=-1)
def _torch_backend() -> AttentionBackend:
    from sparsemm.plugin.attention.torch_ref import TorchBackend

    return TorchBackend()


def _several_threads() -> str | None:
    threads = torch.get_num_threads()
    if threads == 1:
        return None
    return (
        f"several torch threads ({threads}): the C decode kernel runs on one thread, so auto takes it only with "
        f"torch.set_num_threads(1) (or name it: {BACKEND_ENV}=cpu)"
    )


@register_backend("cpu", devices=("cpu",), priority=5, auto_refusal=_several_threads)
def _cpu_backend() -> AttentionBackend:
    """The host-planned CPU step with each layer's decode in C (``plugin.kernels.cpu_decode``)."""
    from sparsemm.plugin.attention.cpu_backends import CpuKernelBackend

    return CpuKernelBackend.create()


@register_backend("cpu-sdpa", devices=("cpu",), priority=4)
def _cpu_sdpa_backend() -> AttentionBackend:
    """The host-planned CPU step with each layer's decode as one gather + ``scaled_dot_product_attention``."""
    from sparsemm.plugin.attention.cpu_backends import CpuSdpaBackend

    return CpuSdpaBackend()


@register_backend("triton", devices=("cuda",), priority=10)
def _triton_backend() -> AttentionBackend:
    """Triton kernels (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``, never picked by ``auto`` there)."""
    try:
        from sparsemm.plugin.attention.triton_backend import TritonBackend
    except ImportError as exc:
        from sparsemm.errors import MissingDependencyError

        raise MissingDependencyError(
            f"the 'triton' attention backend needs triton ({exc}); pip install 'sparsemm[gpu]' or use 'torch'"
        ) from exc
    return TritonBackend()


@register_backend("flashinfer", devices=("cuda",), priority=9)
def _flashinfer_backend() -> AttentionBackend:
    """FlashInfer's paged decode over the folded pool (CUDA; ``flashinfer-python``, the gpu extra). Ranked below
    Triton, the kernel this project tunes and checks; named (or when Triton is missing) it serves after its own
    self-check."""
    from sparsemm.plugin.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend()


__all__ = [
    "BACKENDS",
    "OP_DOMAIN",
    "OP_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "AttentionBackend",
    "DecodePlanner",
    "DecodeStep",
    "LayerwiseDecoder",
    "RaggedShape",
    "StepLevelDefault",
    "Tail",
    "csr_from_tables",
    "get_backend",
    "register_backend",
    "self_check",
]
