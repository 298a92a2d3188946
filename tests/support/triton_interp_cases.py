"""Fixed cases for the ``"triton"`` attention backend under ``TRITON_INTERPRET=1`` (CPU), run in a child process.

``test_triton_backend.py`` runs ``python tests/support/triton_interp_cases.py OUT.json`` with the interpreter switched
on, so the variable is set before triton is imported and cannot leak into other tests of the same pytest worker. Each
case is a random ragged pool ⊕ tail problem from ``ragged_cases.make_case`` (NaN-poisoned free pages, garbage table
entries past each length), run once through the backend into a NaN-poisoned output; the child records the relative
error against the float64 loop reference, the kernel launches it took, and the largest value at rows that see no
key. Importing this module imports neither torch's kernels nor triton (the test collects ``CASES`` from it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_CONTRACT = {
    "decode": dict(pool_lens=[[0, 1], [9, 4], [17, 6]], tail_lens=[1, 1, 1]),
    "long-tail": dict(pool_lens=[[5, 12], [0, 3]], tail_lens=[7, 3]),
    "extend": dict(pool_lens=[[6, 0], [13, 9]], tail_lens=[3, 3], q_len=3),
    "zero-tail": dict(pool_lens=[[6, 2], [13, 9]], tail_lens=[0, 3], q_len=2),
    "no-tail": dict(pool_lens=[[6, 5], [13, 9]], tail_lens=None, q_len=3),
    "kv-skip": dict(pool_lens=[[0, 5], [7, 7]], tail_lens=[0, 1], kv_skip=[[0, 2], [3, 0]]),
}
_GROUPS = {"decode": 7, "long-tail": 1, "extend": 4, "zero-tail": 7, "no-tail": 1, "kv-skip": 2}
_MIXED = dict(pool_lens=[[0, 57, 1], [130, 4, 200], [31, 0, 96]], tail_lens=[0, 2, 1])
_LONG = dict(pool_lens=[[2000, 0], [1, 513], [1024, 37], [16, 1500]], tail_lens=[1, 1, 1, 1])

#: name -> (make_case kwargs, dtype, backend knobs). ``splits`` None: the plan chooses; knobs ``num_sms`` shrink the
#: machine the heuristic sizes for, so a small case still gets several splits.
CASES: dict[str, tuple[dict, str, dict]] = {}
for _name, _kw in _CONTRACT.items():
    CASES[f"{_name}-g{_GROUPS[_name]}-fp32-single"] = (dict(_kw, group=_GROUPS[_name]), "fp32", dict(num_splits=1))
    CASES[f"{_name}-g{_GROUPS[_name]}-fp32-split4"] = (
        dict(_kw, group=_GROUPS[_name]),
        "fp32",
        dict(num_splits=4, block_n=16),
    )
for _name, _g in (("decode", 4), ("extend", 7), ("long-tail", 1)):
    CASES[f"{_name}-g{_g}-fp16-single"] = (dict(_CONTRACT[_name], group=_g), "fp16", dict(num_splits=1))
    CASES[f"{_name}-g{_g}-fp16-split3"] = (dict(_CONTRACT[_name], group=_g), "fp16", dict(num_splits=3, block_n=16))
CASES.update(
    {
        "mixed-d64-g4-fp16-single": (dict(_MIXED, group=4, head_dim=64), "fp16", dict(num_splits=1)),
        "mixed-d80-g7-fp32-split2": (dict(_MIXED, group=7, head_dim=80), "fp32", dict(num_splits=2, block_n=32)),
        "mixed-d96-g1-fp16-split3": (dict(_MIXED, group=1, head_dim=96), "fp16", dict(num_splits=3, block_n=32)),
        "mixed-d128-g4-fp32-single": (dict(_MIXED, group=4, head_dim=128), "fp32", dict(num_splits=1)),
        "page1-g7-fp16-split2": (
            dict(pool_lens=[[0, 33], [16, 1]], tail_lens=[2, 1], group=7, page_size=1),
            "fp16",
            dict(num_splits=2, block_n=16),
        ),
        "page16-g3-fp32-single": (
            dict(pool_lens=[[0, 33], [16, 1]], tail_lens=[2, 1], group=3, page_size=16),
            "fp32",
            dict(num_splits=1),
        ),
        "page3-g4-fp16-split2": (dict(_MIXED, group=4, page_size=3), "fp16", dict(num_splits=2, block_n=16)),
        "long2k-d128-g7-fp16-single": (dict(_LONG, group=7, head_dim=128, page_size=16), "fp16", dict(num_splits=1)),
        "long2k-d64-g4-fp32-auto": (
            dict(_LONG, group=4, head_dim=64, page_size=16, tail_lens=[5, 0, 2, 1]),
            "fp32",
            dict(num_sms=16),
        ),
        "long-extend-lq4-g7-fp16-split4": (
            dict(pool_lens=[[1200, 3], [0, 700]], tail_lens=[4, 4], group=7, page_size=4, q_len=4),
            "fp16",
            dict(num_splits=4),
        ),
        "extend-lq12-g7-two-row-tiles-fp32-split2": (
            dict(pool_lens=[[40, 0]], tail_lens=[12], group=7, q_len=12),
            "fp32",
            dict(num_splits=2, block_n=16),
        ),
        "decode-g4-fp16-default-plan": (dict(_MIXED, group=4), "fp16", {}),
    }
)
#: The TensorRT AOT plugin entry (``triton_decode.plugin_decode``): name -> (pool lengths, group, head dim, page,
#: dtype); each entry's tail is its one new token.
PLUGIN_CASES: dict[str, tuple[list[list[int]], int, int, int, str]] = {
    "plugin-decode-g7-d16-fp32": (_CONTRACT["decode"]["pool_lens"], 7, 16, 4, "fp32"),
    "plugin-mixed-g4-d64-fp16": (_MIXED["pool_lens"], 4, 64, 4, "fp16"),
    "plugin-mixed-g1-d80-fp32": (_MIXED["pool_lens"], 1, 80, 16, "fp32"),
    "plugin-long-g20-d128-fp16": (_LONG["pool_lens"], 20, 128, 16, "fp16"),  # two row tiles of 16
}
#: Cases run without ``out=`` (the backend allocates the output).
NO_OUT = {"decode-g4-fp16-default-plan"}
DTYPES = {"fp32": "float32", "fp16": "float16"}


def _run_case(name: str, seed: int) -> dict:
    import torch

    from sparsemm.plugin.attention.triton_backend import TritonBackend
    from sparsemm.plugin.kernels import triton_decode as kern
    from support.ragged_cases import make_case, reference

    kwargs, dtype_name, knobs = CASES[name]
    dtype = getattr(torch, DTYPES[dtype_name])
    case = make_case(seed, **kwargs)
    ref = reference(case)
    run = case.cast(dtype)
    backend = TritonBackend(**knobs)
    plan = backend.plan(run.shape)
    out = None if name in NO_OUT else torch.full(run.q.shape, float("nan"), dtype=dtype)
    if plan.num_splits > 1:  # stale garbage in the split workspace must never reach the output either
        for buf in backend.workspace(plan, run.q.device):
            buf.fill_(float("nan"))
    before = kern.LAUNCHES
    got = backend.run(
        plan,
        run.q,
        run.k_pages,
        run.v_pages,
        run.tables,
        run.lens,
        run.rows,
        kv_skip=run.kv_skip,
        tail=run.tail,
        out=out,
    )
    launches = kern.LAUNCHES - before
    empty = ref.abs().amax(-1) == 0  # rows that see no key: exact zeros expected
    diff = got.double() - ref
    return {
        "rel_err": float(diff.norm() / ref.norm()) if not torch.isnan(got).any() else None,
        "launches": launches,
        "expected_launches": 1 if plan.num_splits == 1 else 2,
        "num_splits": plan.num_splits,
        "dtype": str(got.dtype).replace("torch.", ""),
        "shape_ok": tuple(got.shape) == tuple(case.q.shape),
        "wrote_into_out": out is None or got.data_ptr() == out.data_ptr(),
        "empty_rows": int(empty.sum()),
        "empty_max": float(got.double()[empty].abs().max()) if bool(empty.any()) else 0.0,
    }


def _run_plugin_case(name: str, seed: int) -> dict:
    """The plugin entry on one ragged case whose tail is each entry's new token, into a NaN-poisoned output."""
    import torch

    from sparsemm.plugin.kernels import triton_decode as kern
    from support.ragged_cases import make_case, reference

    pool_lens, group, head_dim, page, dtype_name = PLUGIN_CASES[name]
    case = make_case(seed, pool_lens=pool_lens, tail_lens=[1] * len(pool_lens), group=group, head_dim=head_dim,
                     page_size=page)  # fmt: skip
    ref = reference(case)[:, :, 0]
    run = case.cast(getattr(torch, DTYPES[dtype_name]))
    slot = run.tail.loc[:, 0].long()
    k_new, v_new = run.tail.k_buf[slot].contiguous(), run.tail.v_buf[slot].contiguous()
    before = kern.LAUNCHES
    got = kern.plugin_decode(run.q[:, :, 0].contiguous(), k_new, v_new, run.k_pages, run.v_pages, run.tables,
                             run.lens, run.rows, run.shape.scale)  # fmt: skip
    return {
        "rel_err": float((got.double() - ref).norm() / ref.norm()) if not torch.isnan(got).any() else None,
        "launches": kern.LAUNCHES - before,
        "dtype": str(got.dtype).replace("torch.", ""),
        "shape_ok": tuple(got.shape) == tuple(ref.shape),
    }


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 set before triton is imported")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package
    import torch

    torch.set_num_threads(1)
    from sparsemm.plugin.attention import self_check
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    results: dict[str, dict] = {}
    for i, name in enumerate(CASES):
        start = time.perf_counter()
        results[name] = _run_case(name, 1000 + i)
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
    for i, name in enumerate(PLUGIN_CASES):
        results[name] = _run_plugin_case(name, 2000 + i)
    for dtype_name in ("fp32", "fp16"):
        dtype = getattr(torch, DTYPES[dtype_name])
        results[f"self-check-{dtype_name}"] = {
            "rel_err": self_check(TritonBackend(), device="cpu", dtype=dtype, head_dim=16, page_size=4, seed=7)
        }
    # the GPU script's decode step (run over pool ⊕ the new token, then the in-place append), eagerly twice
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the benchmarks package
    from benchmarks.gpu_decode import decode_step_graph

    results["gpu-script-decode-step"] = decode_step_graph(torch, "cpu", quick=True)
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
