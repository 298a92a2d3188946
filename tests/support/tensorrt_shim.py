"""Test-only: make ``import tensorrt.plugin`` work with TensorRT 11.4's lean runtime wheels (no builder).

``tensorrt-lean-cu13-bindings`` installs as ``tensorrt_lean_bindings`` and carries the real ``plugin`` package
(trtp), which does ``import tensorrt as trt``. ``load_trtp`` aliases ``tensorrt`` to the lean bindings and adds the
builder-only names trtp touches that the lean module lacks. Checked against 11.4.0.106 (every ``trt.<name>`` in
``plugin/*.py``): importing needs only ``TensorFormat`` (annotations, ``_tensor.py``) and ``ITensor`` (annotation of
``PluginDef.__call__``, ``_lib.py``); ``TensorDesc``, ``from_shape_expr`` and ``plugin`` appear only in docstrings,
``INetworkDefinition`` nowhere. ``TensorFormat.LINEAR`` is read again only when a builder asks for format
combinations, which cannot happen without a builder. A real ``tensorrt`` package, when installed, is used as is.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
from types import ModuleType

LEAN_MODULE = "tensorrt_lean_bindings"
#: Why the TensorRT tests skip when neither a real TensorRT nor the lean wheels are installed.
MISSING_REASON = "needs tensorrt or the lean runtime wheels (pip install -c constraints.txt 'sparsemm[tensorrt-lean]')"


class TensorFormat(enum.IntEnum):
    """Stand-in for the builder's ``trt.TensorFormat`` (only ``LINEAR`` matters to trtp)."""

    LINEAR = 0


class ITensor:
    """Stand-in for the builder's ``trt.ITensor`` (a network tensor; none exist without a builder)."""


def available() -> bool:
    """Whether ``tensorrt`` or the lean bindings can be imported here."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", LEAN_MODULE))


def load_trtp() -> tuple[ModuleType, ModuleType]:
    """``(tensorrt, tensorrt.plugin)``, shimming the lean bindings in as ``tensorrt`` when no real one is present."""
    if "tensorrt" not in sys.modules and importlib.util.find_spec("tensorrt") is None:
        import tensorrt_lean_bindings as lean

        for name, stand_in in (("TensorFormat", TensorFormat), ("ITensor", ITensor)):
            if not hasattr(lean, name):
                setattr(lean, name, stand_in)
        sys.modules["tensorrt"] = lean
    import tensorrt
    import tensorrt.plugin as trtp

    return tensorrt, trtp
