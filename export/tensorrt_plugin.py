"""The ``tensorrt.plugin`` ("trtp") registration of ``SparseMMRaggedDecode``: what TensorRT's ONNX parser binds the
decode graph's custom nodes to (by op type, ``plugin_version`` and ``plugin_namespace``).

``register_tensorrt_plugin(kit_folder)`` registers ``"sparsemm::SparseMMRaggedDecode"`` with trtp:

* **descriptor** (``@trtp.register``): the node's eight inputs ``q [B, Hq, D]``, ``k_new, v_new [B, Hkv, D]``,
  ``k_pages, v_pages [N, P, D]``, ``tables [R, Hkv, W]``, ``lens [R, Hkv]``, ``rows [B]`` (int32 metadata) and the
  attributes the exporter stamps (``ATTRIBUTES``, as typed parameters) give one output shaped and typed like ``q``,
  aliasing nothing (the contract: the node attends over pool ⊕ the new token; the runner appends after the step);
* **JIT** (``@trtp.impl``): ``ragged_decode_forward`` on the plugin's tensors through the runtime's backend registry;
* **AOT** (``@trtp.aot_impl``, when a kit folder is given): the PTX and launch of ``sparsemm-export --target
  tensorrt``'s kit (``plugin.json``): its entry takes the node's input pointers in order, four int32 scalars and the
  output pointer, what TensorRT passes an AOT plugin kernel; a kit whose entry does not (one written before the plugin
  entry) is refused with the reasons (``PluginKit.abi_problems``).

TensorRT's parser hands a creator its fields as INT32 (INT), FLOAT32 (FLOAT), INT32 arrays (INTS) and NUL-terminated
CHAR arrays (STRING); ``parse_plugin_fields`` turns them into the attribute values. Importing this module imports
neither TensorRT nor triton (only torch, as the export side does); ``register_tensorrt_plugin`` imports
``tensorrt.plugin`` when called.

No annotations are postponed here: trtp reads the decorated functions' annotations as classes.
"""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemm.errors import MissingDependencyError, SparseMMError
from sparsemm.plugin.attention import OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.kernels import qk_scale_bits

#: The trtp plugin id: ``"<namespace>::<op type>"``.
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_NAME}"
#: The node's inputs, in order (``decode_attention._symbolic``).
INPUT_NAMES = ("q", "k_new", "v_new", "k_pages", "v_pages", "tables", "lens", "rows")
#: The node's one output.
OUTPUT_NAMES = ("out",)
#: Plugin attributes (the creator's fields, in this order) and their Python types: what the exporter writes on each
#: node (``sm_scale``/``layer`` in the symbolic, the rest in ``onnx_io.stamp_plugin_nodes``).
ATTRIBUTES: dict[str, type] = {
    "sm_scale": float,
    "layer": int,
    "num_q_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "page_size": int,
    "window": int,
    "caps": list,
    "plan_sha256": str,
}
#: Node attributes that bind the node to the creator; the parser does not pass them as fields.
BINDING_ATTRIBUTES = ("plugin_namespace", "plugin_version")
#: The kit kernel's pointer parameters -> the plugin tensor TensorRT passes there (None: no plugin tensor; the
#: attend kernel of kits written before the plugin entry had such pointers).
KERNEL_POINTERS: dict[str, str | None] = {
    "q_ptr": "q",
    "knew_ptr": "k_new",
    "vnew_ptr": "v_new",
    "k_ptr": "k_pages",
    "v_ptr": "v_pages",
    "tables_ptr": "tables",
    "lens_ptr": "lens",
    "rows_ptr": "rows",
    "out_ptr": "out",
    "skip_ptr": None,
    "kbuf_ptr": None,
    "vbuf_ptr": None,
    "loc_ptr": None,
    "tlen_ptr": None,
    "lse_ptr": None,
}
_FLOAT_DTYPES = ("FLOAT", "HALF", "BF16")
#: TensorRT ``DataType`` name -> the kernel signature's element type.
_KERNEL_ELEMENT = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}


# -- attributes ------------------------------------------------------------------------------------------------


def parse_plugin_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The node's attribute values from plugin fields as TensorRT delivers them (``{name: numpy array}``).

    INT32/INT64 arrays of one element become ``int``, FLOAT32/FLOAT64 ones ``float``, ``caps`` (INTS) a list of
    ints, CHAR/uint8/int8 arrays (or ``bytes``/``str``) a string cut at its first NUL (the parser's C strings carry
    one). Binding attributes are skipped; an unknown name, or a value of the wrong kind, raises ``SparseMMError``."""
    parsed: dict[str, Any] = {}
    for name, raw in fields.items():
        if name in BINDING_ATTRIBUTES:
            continue
        kind = ATTRIBUTES.get(name)
        if kind is None:
            raise SparseMMError(f"{OP_NAME}: unknown plugin field {name!r}; expected {', '.join(ATTRIBUTES)}")
        if kind is str:
            parsed[name] = _c_string(raw)
            continue
        values = np.asarray(raw).reshape(-1)
        numeric = np.issubdtype(values.dtype, np.integer) or (
            kind is float and np.issubdtype(values.dtype, np.floating)
        )
        if not numeric or (kind is not list and values.size != 1):
            raise SparseMMError(f"{OP_NAME}: field {name!r} must be {kind.__name__}, got {values.dtype} {values.shape}")
        parsed[name] = [int(v) for v in values] if kind is list else kind(values[0])
    return parsed


def _c_string(raw: Any) -> str:
    """A CHAR field's text: bytes up to the first NUL, UTF-8 (a ``SparseMMError`` for anything else)."""
    if isinstance(raw, str):
        return raw.split("\0", 1)[0]
    if isinstance(raw, bytes):
        data = raw
    else:
        values = np.asarray(raw)
        if values.dtype not in (np.int8, np.uint8):
            raise SparseMMError(f"{OP_NAME}: a string field must be CHAR bytes, got {values.dtype} {values.shape}")
        data = np.ascontiguousarray(values).reshape(-1).view(np.uint8).tobytes()
    try:
        return data.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparseMMError(f"{OP_NAME}: a string field is not UTF-8 ({exc})") from None


def descriptor_problems(dtypes: Mapping[str, str], ranks: Mapping[str, int], attrs: Mapping[str, Any]) -> list[str]:
    """Why the plugin's inputs (TensorRT ``DataType`` names, ranks) and attributes break the node's contract
    (empty: they fit). Shapes are symbolic when TensorRT asks, so only ranks, types and attributes are checked."""
    want_rank = {"q": 3, "k_new": 3, "v_new": 3, "k_pages": 3, "v_pages": 3, "tables": 3, "lens": 2, "rows": 1}
    problems = [f"{n} has rank {ranks[n]}, expected {r}" for n, r in want_rank.items() if ranks[n] != r]
    problems += [f"{n} is {dtypes[n]}, expected INT32" for n in ("tables", "lens", "rows") if dtypes[n] != "INT32"]
    if dtypes["q"] not in _FLOAT_DTYPES:
        problems.append(f"q is {dtypes['q']}, expected one of {', '.join(_FLOAT_DTYPES)}")
    problems += [
        f"{n} is {dtypes[n]} but q is {dtypes['q']}"
        for n in ("k_new", "v_new", "k_pages", "v_pages")
        if dtypes[n] != dtypes["q"]
    ]
    hq, hkv = int(attrs["num_q_heads"]), int(attrs["num_kv_heads"])
    if hkv < 1 or hq % hkv:
        problems.append(f"num_q_heads={hq} is not a multiple of num_kv_heads={hkv}")
    if len(attrs["caps"]) != hkv:
        problems.append(f"caps has {len(attrs['caps'])} entries for {hkv} KV heads")
    return problems


# -- JIT ---------------------------------------------------------------------------------------------------------


def ragged_decode_forward(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    *,
    sm_scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """The node's output ``[B, Hq, D]``: ``q`` over each sequence's pool tokens ⊕ the new token, on torch tensors.

    The backend comes from the runtime's registry (``get_backend``: ``auto`` takes the best self-checked one for
    the tensors' device, ``SPARSEMM_ATTENTION_BACKEND`` forces one); the arithmetic is the exported node's
    (``decode_attention.attend_new_token``), planned from shapes only, so a CUDA call needs no host synchronisation."""
    from sparsemm.export.decode_attention import attend_new_token

    return attend_new_token(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, sm_scale, backend=backend)


# -- AOT ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginKit:
    """The kit ``--target tensorrt`` writes: the kernel's PTX and what ``plugin.json`` says about launching it."""

    folder: Path
    entry: str
    ptx: str
    arch: str
    block: tuple[int, int, int]
    shared_bytes: int
    signature: dict[str, str]
    constexprs: dict[str, Any]
    query_group: int

    def abi_problems(self) -> list[str]:
        """Where the entry's parameters depart from how TensorRT launches an AOT plugin kernel: the input tensors'
        pointers in node order, then the int32 scalars (``SymExprs``), then the output pointers, nothing else
        (empty: TensorRT can launch it). A ``.f32`` scalar gets the int32 with the same bits, so it is no problem."""
        params = {n: kind for n, kind in self.signature.items() if kind != "constexpr"}
        problems = []
        orphans = [n for n, kind in params.items() if kind.startswith("*") and KERNEL_POINTERS.get(n) is None]
        if orphans:
            problems.append(f"pointer parameters {', '.join(orphans)} have no plugin tensor to receive")
        roles: list[str] = []  # each pointer's plugin tensor, a run of scalars as one "scalars"
        for name, kind in params.items():
            role = KERNEL_POINTERS.get(name) if kind.startswith("*") else "scalars"
            if role is not None and not (role == "scalars" and roles[-1:] == ["scalars"]):
                roles.append(role)
        expected = [*INPUT_NAMES, "scalars", *OUTPUT_NAMES]
        if roles != expected:
            problems.append(f"parameters in the order ({', '.join(roles)}); TensorRT passes ({', '.join(expected)})")
        extra = ptx_param_count(self.ptx, self.entry) - len(params)
        if extra:
            problems.append(
                f"the PTX entry {self.entry} has {extra:+d} parameters beyond plugin.json's signature (triton's "
                "scratch pointers), which TensorRT does not pass"
            )
        return problems


def ptx_param_count(ptx: str, entry: str) -> int:
    """Parameters of ``.entry <entry>(...)`` in ``ptx``."""
    found = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.DOTALL)
    if found is None:
        raise SparseMMError(f"the PTX has no entry {entry!r}")
    return found.group(1).count(".param")


def load_plugin_kit(folder: str | Path, *, arch: str | None = None) -> PluginKit:
    """Read a kit folder's ``plugin.json`` and PTX; ``arch`` (e.g. ``sm_90a``) refuses a kit built for another. A
    missing, malformed or foreign ``plugin.json`` (or a PTX file named outside the folder) is a ``SparseMMError``
    naming the fix."""
    from sparsemm.export.tensorrt_kit import PLUGIN_FILE

    folder = Path(folder)
    path = folder / PLUGIN_FILE
    fix = "re-export it with sparsemm-export --target tensorrt --force"
    if not path.is_file():
        raise SparseMMError(f"{folder} holds no {PLUGIN_FILE}: export it with sparsemm-export --target tensorrt")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        ours = {"name": OP_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE}
        if not isinstance(description, dict) or description.get("plugin") != ours:
            raise SparseMMError(f"{path} does not describe the plugin {ours}; {fix}")
        kernel, launch = description["kernel"], description["kernel"]["launch"]
        name = kernel["file"]
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise SparseMMError(f"{path} names the PTX file {name!r}, not a file of the kit's folder; {fix}")
        ptx = (folder / name).read_text(encoding="utf-8")
        block = tuple(int(x) for x in launch["block"])
        kit = PluginKit(
            folder=folder,
            entry=str(kernel["entry"]),
            ptx=ptx,
            arch=str(kernel["arch"]),
            block=block,
            shared_bytes=int(launch["shared_bytes"]),
            signature={str(k): str(v) for k, v in dict(kernel["signature"]).items()},
            constexprs=dict(kernel["constexprs"]),
            query_group=int(kernel["query_group"]),
        )
    except SparseMMError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SparseMMError(
            f"{path} is not a plugin kit sparsemm-export wrote ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    if len(kit.block) != 3 or min(kit.block) < 1 or kit.shared_bytes < 0 or kit.query_group < 1:
        raise SparseMMError(f"{path} gives an impossible launch (block {kit.block}); {fix}")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    if target is None or target.group(1) != kit.arch:
        raise SparseMMError(f"{name} targets {target and target.group(1)}, plugin.json says {kit.arch}; {fix}")
    if arch is not None and kit.arch != arch:
        raise SparseMMError(f"the kit in {folder} is compiled for {kit.arch}, not the requested {arch}")
    return kit


@dataclass(frozen=True)
class AotLaunch:
    """What an AOT implementation returns, in plain values (ints, or trtp shape expressions when given them)."""

    entry: str
    ptx: str
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_bytes: int
    scalars: tuple[tuple[str, Any], ...]  # the entry's non-pointer parameters in order, with their values


def aot_launch(
    kit: PluginKit, attrs: Mapping[str, Any], *, batch: Any, width: Any, dtype: str | None = None
) -> AotLaunch:
    """The kit kernel's launch for a node with ``attrs``, ``batch`` entries and ``width`` table columns.

    ``batch`` and ``width`` are ints or symbolic dimensions (trtp ``ShapeExpr``: only ``dim * int`` is used). The
    grid is one program per (entry, KV head) and row tile of the query group, single launch; the block and shared
    memory are ``plugin.json``'s; the scalars are the plugin kernel's (``triton_decode.PLUGIN_SCALARS``: the scale's
    bits, the KV heads, the group, the table width). Refuses a node the kit was not compiled for, including its data
    type when ``dtype`` (TensorRT's ``DataType`` name of ``q``) is given."""
    element = kit.signature.get("q_ptr", "").lstrip("*")
    if dtype is not None and _KERNEL_ELEMENT.get(dtype) != element:
        raise SparseMMError(f"the kit's kernel is compiled for {element} data; the node's q is {dtype}")
    hq, hkv, d, page = (int(attrs[k]) for k in ("num_q_heads", "num_kv_heads", "head_dim", "page_size"))
    group = hq // hkv
    compiled = {"D": kit.constexprs.get("D"), "P": kit.constexprs.get("P"), "query_group": kit.query_group}
    wanted = {"D": d, "P": page, "query_group": group}
    if compiled != wanted:
        raise SparseMMError(f"the kit's kernel is compiled for {compiled}; the node needs {wanted}")
    values = {
        "qk_scale_bits": qk_scale_bits(float(attrs["sm_scale"])),
        "num_kv_heads": hkv,
        "group": group,
        "width": width,
    }
    scalars = []
    for name, kind in kit.signature.items():
        if kind == "constexpr" or kind.startswith("*"):
            continue
        if name not in values:
            raise SparseMMError(f"the kit's kernel takes a scalar {name!r} the plugin cannot supply")
        scalars.append((name, values[name]))
    block_m = kit.constexprs.get("BLOCK_M")
    if not isinstance(block_m, int) or block_m < 1:
        raise SparseMMError(f"the kit's kernel has no row tile (BLOCK_M={block_m!r}); re-export the kit")
    row_tiles = math.ceil(group / block_m)
    return AotLaunch(kit.entry, kit.ptx, (batch * hkv, 1, row_tiles), kit.block, kit.shared_bytes, tuple(scalars))


# -- registration ------------------------------------------------------------------------------------------------


@dataclass
class RegisteredPlugin:
    """This process's registration: the plugin id, the creator's field names, the kit the AOT path serves."""

    plugin_id: str
    field_names: tuple[str, ...]
    kit: PluginKit | None = None
    aot: bool = False


_REGISTERED: RegisteredPlugin | None = None


def import_trtp() -> Any:
    """``tensorrt.plugin``, or ``MissingDependencyError`` naming what to install."""
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise MissingDependencyError(
            f"registering the {OP_NAME} TensorRT plugin needs NVIDIA TensorRT's Python package with its "
            f"tensorrt.plugin module ({exc}): pip install tensorrt (a release with tensorrt.plugin; AOT plugins need "
            "one whose tensorrt.plugin has aot_impl)"
        ) from exc
    return trtp


def register_tensorrt_plugin(kit_folder: str | Path | None = None, *, arch: str | None = None) -> RegisteredPlugin:
    """Register ``"sparsemm::SparseMMRaggedDecode"`` with TensorRT's plugin registry (once per process).

    Always the descriptor and the JIT implementation; with ``kit_folder`` (a ``--target tensorrt`` folder) also
    the AOT implementation serving its PTX (``arch``: the kit must be compiled for it). With both, an engine build
    chooses with ``PREFER_AOT_PYTHON_PLUGINS`` / ``PREFER_JIT_PYTHON_PLUGINS``. Calling again with another kit
    points the AOT implementation at it."""
    global _REGISTERED
    trtp = import_trtp()
    kit = load_plugin_kit(kit_folder, arch=arch) if kit_folder is not None else None
    if _REGISTERED is None:
        _register_descriptor_and_jit(trtp)
        _REGISTERED = RegisteredPlugin(PLUGIN_ID, tuple(ATTRIBUTES))
    if kit is not None:
        _REGISTERED.kit = kit
        if not _REGISTERED.aot:
            _register_aot(trtp)
            _REGISTERED.aot = True
    return _REGISTERED


def _register_descriptor_and_jit(trtp: Any) -> None:
    import numpy.typing as npt

    desc = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def describe(
        q: desc,
        k_new: desc,
        v_new: desc,
        k_pages: desc,
        v_pages: desc,
        tables: desc,
        lens: desc,
        rows: desc,
        sm_scale: float,
        layer: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        window: int,
        caps: npt.NDArray[np.int32],
        plan_sha256: str,
    ) -> desc:
        """One output with ``q``'s shape expressions and dtype, aliasing no input."""
        inputs = dict(zip(INPUT_NAMES, (q, k_new, v_new, k_pages, v_pages, tables, lens, rows)))
        problems = descriptor_problems(
            {n: t.dtype.name for n, t in inputs.items()},
            {n: t.ndim for n, t in inputs.items()},
            {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "caps": caps},
        )
        if problems:
            raise SparseMMError(f"{OP_NAME} layer {layer}: " + "; ".join(problems))
        return trtp.from_shape_expr(q.shape_expr, dtype=q.dtype)

    @trtp.impl(PLUGIN_ID)
    def run(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, sm_scale: float, outputs, stream) -> None:
        """The JIT path: torch views of TensorRT's buffers, ``ragged_decode_forward`` on TensorRT's stream (fp16 and
        fp32 I/O: trtp's ``__cuda_array_interface__`` refuses bfloat16)."""
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tensors = [
                torch.as_tensor(t, device="cuda") for t in (q, k_new, v_new, k_pages, v_pages, tables, lens, rows)
            ]
            torch.as_tensor(outputs[0], device="cuda").copy_(ragged_decode_forward(*tensors, sm_scale=sm_scale))


def _register_aot(trtp: Any) -> None:
    # every attribute, in the registered order: trtp's AOT plugin passes all of them positionally
    @trtp.aot_impl(PLUGIN_ID)
    def compile_kernel(
        q,
        k_new,
        v_new,
        k_pages,
        v_pages,
        tables,
        lens,
        rows,
        sm_scale,
        layer,
        num_q_heads,
        num_kv_heads,
        head_dim,
        page_size,
        window,
        caps,
        plan_sha256,
        outputs,
        tactic,
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        """The kit's PTX, its launch and the kernel's scalars as ``SymInt32``s (refused while its ABI does not fit)."""
        kit = _REGISTERED.kit
        problems = kit.abi_problems()
        if problems:
            raise SparseMMError(
                f"{OP_NAME}: the kit in {kit.folder} cannot be launched by TensorRT as an AOT plugin: "
                + "; ".join(problems)
                + ". Build with PREFER_JIT_PYTHON_PLUGINS (the JIT implementation) until the kit has such an entry"
            )
        attrs = {"sm_scale": sm_scale, "num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads}
        attrs.update(head_dim=head_dim, page_size=page_size)
        launch = aot_launch(kit, attrs, batch=q.shape_expr[0], width=tables.shape_expr[2], dtype=q.dtype.name)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid
        params.block_x, params.block_y, params.block_z = launch.block
        params.shared_mem = launch.shared_bytes
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for _, value in launch.scalars])
        return launch.entry, launch.ptx, params, scalars
