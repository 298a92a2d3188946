"""Human-readable summary of a budget plan (``sparsemm budgets`` without ``--json``)."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from sparsemm.plugin.budgets import BudgetPlan


def plan_layer_stats(plan: BudgetPlan) -> list[dict]:
    """Per layer: min / median / max cap, share of all caps, heads at the floor."""
    caps = plan.caps_array()
    total = caps.sum()
    floor = plan.floor
    return [
        {
            "layer": layer,
            "min": int(row.min()),
            "median": float(np.median(row)),
            "max": int(row.max()),
            "share": float(row.sum() / total) if total else 0.0,
            "at_floor": int((row == floor).sum()) if floor is not None else 0,
        }
        for layer, row in enumerate(caps)
    ]


def print_plan_summary(plan: BudgetPlan, console: Console | None = None) -> None:
    console = console or Console()
    sig = plan.signature
    head = f"[bold]{plan.method}[/] plan for {sig.shape_text()}: window {plan.window}, kernel {plan.kernel}"
    if plan.budget is not None:
        head += f", budget {plan.budget} per KV head (window included)"
    if plan.ratio is not None and plan.method in ("sparsemm", "random"):
        head += f", ratio {plan.ratio}, floor {plan.floor}"
    console.print(head)
    if plan.is_full:
        console.print("keeps every prompt token in every head (no compression)")
        return
    if plan.is_adaptive:
        console.print(
            f"AdaKV: {plan.layer_totals[0]} tokens per layer outside the windows, split across heads per input "
            f"(each head first gets {plan.floor} = floor ratio {plan.floor_ratio} of B − w)"
        )
        return
    caps = plan.caps_array()
    stats = plan_layer_stats(plan)
    table = Table("layer", "min cap", "median", "max cap", "share", "heads at floor", box=None)
    for s in stats:
        table.add_row(
            str(s["layer"]),
            str(s["min"]),
            f"{s['median']:g}",
            str(s["max"]),
            f"{100 * s['share']:.1f}%",
            f"{s['at_floor']}/{sig.num_kv_heads}",
        )
    console.print(table)
    l, h = np.unravel_index(int(caps.argmax()), caps.shape)
    at_floor = (caps == plan.floor).mean() if plan.floor is not None else 0.0
    console.print(
        f"caps outside the window: total {int(caps.sum())} (uniform would be "
        f"{(plan.budget - plan.window) * caps.size}), median {np.median(caps):g}, max {int(caps.max())} "
        f"(layer {l} KV head {h}), {100 * at_floor:.0f}% of heads at the floor"
    )
