"""``sparsemm capacity``: how many more requests fit, and how much faster decode gets, for a model shape on a GPU
(a projection from ``plugin/capacity.py``, labelled as one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sparsemm.errors import ModelResolutionError, SparseMMError


def model_config(name: str) -> tuple[dict[str, Any], Any]:
    """A model's ``config.json`` dict and its spec (``None`` for a known model that is not downloaded, whose shapes
    come from ``known_configs``)."""
    from sparsemm.known_configs import KNOWN_CONFIGS
    from sparsemm.resolve import KNOWN_MODELS, resolve_spec

    try:
        spec = resolve_spec(name)
        return spec.config(), spec
    except ModelResolutionError:
        hub_id = KNOWN_MODELS.get(name.lower(), name)
        if hub_id in KNOWN_CONFIGS:
            return KNOWN_CONFIGS[hub_id], None
        raise


def plan_for(config: dict, spec, budget: int, profile: str | None, window: int | None, page_size: int | None):
    """``(recipe, note)``: the model's sparsemm plan (its shipped or a given profile), else uniform SnapKV caps."""
    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.signature import ModelSignature

    sig = ModelSignature.from_config(config)
    shipped = spec is not None and spec.profile_path is not None
    if profile is not None or shipped:
        recipe = plan_recipe(spec, signature=sig, profile=profile, budget=budget, window=window, page_size=page_size)
        return recipe, f"{recipe.method} caps from {'the given' if profile else 'the shipped'} profile"
    recipe = plan_recipe(None, signature=sig, method="snapkv", budget=budget, window=window, page_size=page_size)
    return recipe, "no head profile for this model: uniform caps (SnapKV); --profile F gives SparseMM's caps"


@click.command("capacity")
@click.option("--model", "model_name", required=True, help="tiny, a known name (llava, qwen2-vl, ...) or a folder")
@click.option("--budget", type=int, default=256, show_default=True, help="average prompt tokens kept per KV head")
@click.option("--prompt", type=int, default=32768, show_default=True, help="prompt tokens per request (P)")
@click.option("--output", type=int, default=512, show_default=True, help="new tokens per request (O)")
@click.option("--gpu", default="h100", show_default=True, help="h100, h200, or MEM,BW (GB, TB/s)")
@click.option("--mem-fraction", type=float, default=None, help="share of GPU memory for weights + KV [0.88]")
@click.option("--kv-dtype", type=click.Choice(["bf16", "fp16", "fp8"]), default="bf16", show_default=True)
@click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel ranks (per-rank numbers)")
@click.option("--profile", type=click.Path(exists=True, dir_okay=False), help="head profile [the model's, if shipped]")
@click.option("--window", type=int, help="observation window [the method's]")
@click.option("--page-size", type=int, help="head-pool page size [the model folder's, else 16]")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="write concurrency and step time "
              "against context length to this PNG")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print the projection as JSON")
@click.option("--force", is_flag=True, help="overwrite an existing --plot file")
def capacity(model_name, budget, prompt, output, gpu, mem_fraction, kv_dtype, tp, profile, window, page_size,
             plot, as_json, force) -> None:  # fmt: skip
    """Project KV bytes per request, concurrent requests and the decode step for full cache vs SparseMM.

    A projection, not a measurement: per request the KV bytes of the full cache, of SparseMM's ragged head pool
    (page rounding included; window and outputs in the engine's token pool, as SGLang serves it) and of a padded
    layout (every head at the longest head's length); the most requests that fit the GPU's memory after the weights
    (counting the prompts being prefilled whole, as the served capacity measurement does); and a roofline decode
    step (weights + KV bytes read at the GPU's bandwidth) at batch 1 and at the full cache's largest batch.

    \b
    Examples:
      sparsemm capacity --model llava --budget 256 --prompt 32768 --output 512 --gpu h100
      sparsemm capacity --model qwen2-vl --gpu h200 --kv-dtype fp8 --json
      sparsemm capacity --model ./my-vlm --profile my.profile.json --gpu 48,0.96 --plot capacity.png
    """
    from sparsemm.fileio import check_writable
    from sparsemm.plugin import capacity as cap

    if plot is not None:
        check_writable(plot, force)  # before any work: an existing file is never replaced without --force
    for name, value in (("--budget", budget), ("--prompt", prompt)):
        if value <= 0:
            raise SparseMMError(f"{name} must be a positive integer, got {value}")
    if output < 0:
        raise SparseMMError(f"--output must be 0 or more, got {output}")
    if page_size is not None and page_size < 1:
        raise SparseMMError(f"--page-size must be a positive integer, got {page_size}")
    config, spec = model_config(model_name)
    text = config.get("text_config") or config
    context = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    if context and prompt + output > int(context):
        raise SparseMMError(
            f"--prompt {prompt} + --output {output} exceeds {model_name}'s context of {context} tokens; lower them"
        )
    recipe, note = plan_for(config, spec, budget, profile, window, page_size)
    shape = cap.TextShape.from_config(config)
    device = cap.parse_gpu(gpu)
    fraction = cap.DEFAULT_MEM_FRACTION if mem_fraction is None else mem_fraction
    plan = recipe.build()
    p = cap.project(plan, shape, device, prompt, output, recipe.page_size, kv_dtype, mem_fraction=fraction, tp=tp)
    result = {
        "projection": "roofline and memory arithmetic (plugin/capacity.py), not a measurement",
        "model": model_name,
        "gpu": device.name,
        "setup": {
            "budget": budget,
            "prompt": prompt,
            "output": output,
            "window": plan.window,
            "page_size": recipe.page_size,
            "kv_dtype": kv_dtype,
            "mem_fraction": fraction,
            "tp": tp,
            "weights_gb": shape.weight_params() * 2 / 1e9,
            "caps": note,
        },
        **p.to_dict(),
    }
    if plot is not None:
        contexts = sorted({c for c in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if c <= max(prompt, 1024)}
                          | {prompt})  # fmt: skip
        sweep = cap.context_sweep(lambda n: plan, shape, device, output, recipe.page_size, contexts,
                                  kv_dtype=kv_dtype, mem_fraction=fraction, tp=tp)  # fmt: skip
        _plot(sweep, plot, f"{model_name}, B={budget}, O={output}, {device.name}")
        result["plot"] = str(plot)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    b = p.bytes_per_request
    gb = 1e9
    click.echo(f"PROJECTION (not measured) for {model_name} on {device.name}, per rank at --tp {tp}; {note}")
    click.echo(f"  P={prompt} prompt + O={output} output tokens, budget {budget}, window {plan.window}, "
               f"page {recipe.page_size}, KV {kv_dtype}; weights {p.weights_bytes / gb:.1f} GB, "
               f"KV memory {p.kv_bytes_available / gb:.1f} GB at --mem-fraction {fraction}")  # fmt: skip
    ragged, padded = b.ragged / b.full, b.padded / b.full
    click.echo(
        f"  KV per request:   full {b.full / gb:.3f} GB   sparsemm {b.ragged / gb:.3f} GB ({ragged:.1%})   "
        f"padded {b.padded / gb:.3f} GB ({padded:.1%})"
    )
    click.echo(f"  requests at once: full {p.max_requests_full}   sparsemm {p.max_requests_sparsemm}   "
               f"padded {p.max_requests_padded}")  # fmt: skip
    for label, ms in p.step_ms.items():
        click.echo(f"  decode step, {label}: full {ms['full']:.2f} ms   sparsemm {ms['sparsemm']:.2f} ms   "
                   f"padded {ms['padded']:.2f} ms   speedup {p.speedup[label]:.2f}x")  # fmt: skip


def _plot(sweep: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    x = [r["prompt"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(x, [r["full"] for r in rows], "o-", label="full cache")
    a.plot(x, [r["sparsemm"] for r in rows], "o-", label="sparsemm")
    a.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="requests at once")
    b.plot(x, [r["step_full_ms"] for r in rows], "o-", label="full cache")
    b.plot(x, [r["step_sparsemm_ms"] for r in rows], "o-", label="sparsemm")
    b.set(xscale="log", xlabel="prompt tokens", ylabel="decode step at batch 1 (ms)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PROJECTION: {title}", fontsize=9)
    fig.tight_layout()
    from sparsemm.fileio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # never a half-written file
    plt.close(fig)
