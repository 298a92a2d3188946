"""Pictures and summaries of profiles and plans: a profile's layers × heads heatmap, a plan's caps against
uniform (PNG), and the per-layer summary table ``sparsemm budgets`` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sparsemm.fileio import atomic_write
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path


def top_share(profile: HeadProfile, share: float) -> float:
    """Fraction of the total score held by the top ``share`` of the scored heads (unscored sliding layers aside)."""
    s = profile.normalized().ravel()
    s = np.sort(s[~np.isnan(s)])[::-1]
    k = max(1, int(round(share * s.size)))
    return float(s[:k].sum())


def plot_profile_heatmap(profile: HeadProfile, path: Path, top: float = 0.05) -> Path:
    plt = _pyplot()
    scores = profile.normalized()
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.22 * heads + 2), max(3, 0.2 * layers + 1.5)))
    im = ax.imshow(scores, aspect="auto", cmap="magma", origin="lower")
    scored = ~np.isnan(scores)
    k = max(1, int(round(top * scored.sum())))
    for idx in np.argsort(np.where(scored, scores, -1.0).ravel())[::-1][:k]:
        l, h = divmod(int(idx), heads)
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, heads, max(1, heads // 16)))
    ax.set_yticks(range(0, layers, max(1, layers // 16)))
    prov = profile.provenance
    ax.set_title(
        f"{profile.signature.model_type}: visual-head scores ({prov.get('images', '?')} images)\n"
        f"top {100 * top:g}% of heads (boxed) hold {100 * top_share(profile, top):.0f}% of the score"
        + ("; blank rows: sliding layers, unscored" if not scored.all() else ""),
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="share of total score")
    fig.tight_layout()
    return _save(fig, path)


def plot_plan_caps(plan: BudgetPlan, path: Path) -> Path:
    plt = _pyplot()
    caps = plan.caps_array()
    layers, heads = caps.shape
    uniform = plan.budget - plan.window
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, max(3, 0.2 * layers + 1.5)))
    im = ax.imshow(caps, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, heads, max(1, heads // 16)))
    ax.set_yticks(range(0, layers, max(1, layers // 16)))
    bx.set_yticks(range(0, layers, max(1, layers // 16)))
    ax.set_title(f"{plan.method} caps outside the window (B={plan.budget}, w={plan.window})", fontsize=9)
    fig.colorbar(im, ax=ax, label="tokens")
    totals = caps.sum(1)
    bx.barh(np.arange(layers), totals, color="#2a7", label=plan.method)
    bx.axvline(uniform * heads, color="k", linestyle="--", label=f"uniform ({uniform}/head)")
    bx.set_xlabel("tokens kept per layer (outside windows)")
    bx.set_ylabel("layer")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


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
    own = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan.knobs.items())
    if own:
        head += f", {own}" + (f", floor {plan.floor}" if plan.floor is not None and not plan.is_adaptive else "")
    console.print(head)
    sliding = np.flatnonzero(plan.sliding_layers)
    if sliding.size:
        console.print(
            f"sliding-window layers (window {plan.sliding_window}: each head keeps its last {plan.sliding_window - 1} "
            f"tokens, no budget): {', '.join(map(str, sliding))}; the budget applies to the other "
            f"{plan.signature.num_layers - sliding.size} layers"
        )
    if plan.is_full:
        console.print("keeps every prompt token in every head (no compression)")
        return
    if plan.is_adaptive:
        console.print(
            f"AdaKV: {plan.layer_totals[0]} tokens per layer outside the windows, split across heads per input "
            f"(each head first gets {plan.floor} = floor ratio {plan.knobs.get('floor_ratio')} of B − w)"
        )
        return
    caps = plan.caps_array()
    stats = plan_layer_stats(plan)
    table = Table("layer", "min cap", "median", "max cap", "share", "heads at floor", box=None)
    for s in stats:
        if plan.sliding_layers[s["layer"]]:
            table.add_row(str(s["layer"]), "sliding", "", "", "", "")
            continue
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
    full = caps[~plan.sliding_layers]  # sliding layers keep their windows, not caps
    at_floor = (full == plan.floor).mean() if plan.floor is not None else 0.0
    console.print(
        f"caps outside the window: total {int(full.sum())} (uniform would be "
        f"{(plan.budget - plan.window) * full.size}), median {np.median(full):g}, max {int(caps.max())} "
        f"(layer {l} KV head {h}), {100 * at_floor:.0f}% of heads at the floor"
    )
