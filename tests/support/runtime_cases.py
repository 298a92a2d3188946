"""Small runtime fixtures the plugin's tests share: a full-cache plan of any shape, and an aten-op counter that
flags host synchronisations and boolean-mask indexing."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsemm.plugin.budgets import make_plan
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.signature import ModelSignature


def full_plan(layers: int, hkv: int, group: int = 1, d: int = 16) -> BudgetPlan:
    return make_plan("full", signature=ModelSignature("t", layers, hkv * group, hkv, d), window=1, kernel=1)


class OpCounter(TorchDispatchMode):
    """Counts aten ops, and the ones that synchronise with the host or index by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.forbidden: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"):
            self.forbidden.append(name)
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else ()
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices if i is not None):
                self.forbidden.append(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))
