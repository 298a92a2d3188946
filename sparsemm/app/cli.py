"""The ``sparsemm`` command line: one click group, one sub-command per job.

User mistakes (a profile for another model, impossible budgets, malformed files, an existing output) end
with a one-line ``error: ...`` that names the fix and exit status 2, never a traceback. Heavy imports
(torch, transformers) happen inside the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sparsemm.app.capacity_cmd import capacity
from sparsemm.app.loadtest_cmd import loadtest, serve
from sparsemm.app.progress import Progress
from sparsemm.command_group import ReportingGroup
from sparsemm.errors import SparseMMError
from sparsemm.plugin.budgets import METHODS
from sparsemm.plugin.knob_flags import KnobCommand

#: Decode length of a probe (the paper's 1024) for models whose folder does not say.
PROBE_MAX_NEW_TOKENS = 1024


class SparseMMGroup(ReportingGroup):
    """``error: <message>`` on stderr and exit status 2 for user mistakes."""

    interrupted_message = "interrupted; outputs already written are complete, nothing half-written was kept"


@click.group(cls=SparseMMGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sparsemm")
def cli() -> None:
    """SparseMM: head-sparse KV caching for multimodal LLMs.

    \b
    Offline:  profile a model's visual heads, then turn the profile into a budget plan.
    Serving:  every KV head keeps its own budget of prompt tokens (a ragged, head-paged cache).

    \b
    Quick start on the shipped tiny OCR model:
      sparsemm run                                   # full cache vs SparseMM, table + plot
      sparsemm budgets --profile tiny --budget 48    # what each head keeps
      sparsemm import-profile head_scores.json --config llava/config.json --out llava.profile.json
    """


# ------------------------------------------------------------------------------------------ model-path
@cli.command("model-path")
@click.argument("model", default="tiny")
def model_path(model: str) -> None:
    """Print the local folder of MODEL (tiny, a known name, a hub id in the local cache, or a path).

    \b
    For tools that want a folder, e.g.:
      python -m sglang.launch_server --model-path "$(sparsemm model-path tiny)" ...
    """
    from sparsemm.resolve import resolve_model

    click.echo(str(resolve_model(model)))


# -------------------------------------------------------------------------------------- import-profile
@cli.command("import-profile")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="the model's config.json (or folder)")
@click.option("--layers", type=click.IntRange(min=1), help="number of layers (without --config)")
@click.option("--heads", type=click.IntRange(min=1), help="query heads per layer (without --config)")
@click.option("--kv-heads", type=click.IntRange(min=1), help="KV heads per layer (without --config)")
@click.option("--head-dim", type=click.IntRange(min=1), help="head dimension (optional)")
@click.option("--model-type", default="unknown", show_default=True, help="model type recorded in the signature")
@click.option("--window", type=click.IntRange(min=1), default=32, show_default=True, help="recommended window")
@click.option("--kernel", type=click.IntRange(min=1), default=5, show_default=True, help="recommended pooling kernel")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="profile file to write")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def import_profile(
    file: Path,
    config_path: Path | None,
    layers: int | None,
    heads: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    model_type: str,
    window: int,
    kernel: int,
    out: Path,
    force: bool,
) -> None:
    """Convert an official SparseMM head-score FILE ({"layer-head": [floats]}) to a sparsemm profile.

    Each head's list is reduced by its mean (as upstream does); keys are parsed, not trusted by order. The
    model's shapes come from --config, or from --layers/--heads/--kv-heads.

    \b
    Examples:
      sparsemm import-profile llava-v1.6.json --config llava-v1.6-vicuna-7b-hf/config.json --out llava.profile.json
      sparsemm import-profile llava-v1.6.json --layers 32 --heads 32 --kv-heads 32 --head-dim 128 --out p.json
    """
    from sparsemm.fileio import check_writable
    from sparsemm.profiles.official import import_official_profile
    from sparsemm.signature import ModelSignature

    check_writable(out, force)
    if config_path is not None:
        if any(v is not None for v in (layers, heads, kv_heads, head_dim)):
            raise SparseMMError("give either --config or --layers/--heads/--kv-heads, not both")
        signature = ModelSignature.from_config(_read_config(config_path))
    else:
        if layers is None or heads is None:
            raise SparseMMError("the model's shapes are needed: pass --config config.json, or --layers and --heads")
        signature = ModelSignature(model_type, layers, heads, kv_heads or heads, head_dim)
    profile = import_official_profile(file, signature, window=window, kernel=kernel)
    profile.save(out, force=force)
    click.echo(f"wrote {out}: {signature.shape_text()}")


def _read_config(path: Path) -> dict:
    from sparsemm.errors import ProfileError

    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"config {path} is not a JSON object")
    return data


# --------------------------------------------------------------------------------------------- budgets
def _model_and_profile(model_arg: str | None, profile_arg: str | None):
    """``(spec, profile)`` from ``--model`` / ``--profile``; a ``--profile`` naming a model (``tiny``) is that model."""
    from sparsemm.errors import ModelResolutionError
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec(model_arg) if model_arg else None
    if spec is None and profile_arg and not Path(profile_arg).is_file():
        try:
            spec = resolve_spec(profile_arg)
        except ModelResolutionError:
            spec = None
    return spec, profile_arg


@cli.command("budgets", cls=KnobCommand)
@click.option("--profile", "profile_arg", help="head profile file, or a model that ships one (tiny)")
@click.option("--model", "model_arg", help="model (tiny, name or path): its sparsemm.json defaults and profile")
@click.option("--method", help=f"budget method: {', '.join(METHODS)} [sparsemm with a profile]")
@click.option("--redistribute", is_flag=True, help="give a head's surplus beyond the prompt to the other heads")
@click.option("--skip-short-layers", is_flag=True, help="upstream parity: keep a whole layer when B − w > prompt − w")
@click.option("--json", "as_json", is_flag=True, help="print the plan file to stdout")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the plan file here")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def budgets(
    profile_arg: str | None,
    model_arg: str | None,
    method: str | None,
    redistribute: bool,
    skip_short_layers: bool,
    as_json: bool,
    out: Path | None,
    force: bool,
    **knobs: Any,
) -> None:
    """Turn a head profile into a budget plan: how many prompt tokens each KV head keeps.

    Without --json/--out a summary is printed: per layer the min/median/max cap, the layer's share of all
    kept tokens, and how many heads sit at the floor. Each knob comes from the first of: its flag, the model
    folder's sparsemm.json, the profile's recommendation, the method's default (window 32, kernel 5, ...); the
    line "knobs: ..." says which. A flag the method does not take (--ratio with snapkv) is an error. The knob
    flags are the methods' own declarations: a new method's new knob appears here by itself.

    \b
    Examples:
      sparsemm budgets --model tiny --budget 24                 # the shipped model, its profile and defaults
      sparsemm budgets --profile llava.profile.json --budget 256
      sparsemm budgets --profile tiny --budget 48 --json > plan.json
      sparsemm budgets --model tiny --method snapkv --budget 48 --out snapkv.plan.json
    """
    from sparsemm.fileio import check_writable
    from sparsemm.plugin.recipe import plan_recipe

    if out is not None:
        check_writable(out, force)
    spec, profile = _model_and_profile(model_arg, profile_arg)
    if spec is None and profile is None:
        raise SparseMMError("say which model: --profile FILE (needed for sparsemm) or --model NAME|PATH")
    recipe = plan_recipe(
        spec,
        method=method,
        profile=profile,
        redistribute=redistribute or None,
        short_prompt="skip_layer" if skip_short_layers else None,
        **knobs,
    )
    plan = recipe.build()
    click.echo(f"knobs: {recipe.describe()}", err=as_json)
    if out is not None:
        plan.save(out, force=force)
        click.echo(f"wrote {out}", err=as_json)
    if as_json:
        click.echo(plan.to_json(), nl=False)
    elif out is None:
        from sparsemm.app.viz import print_plan_summary

        print_plan_summary(plan)


# ------------------------------------------------------------------------------------------- run / eval
def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SparseMMError(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise SparseMMError("expected at least one value in a comma-separated list")
    return out


def load_supported_model(name: str, *, what: str = "the SparseMM ragged KV cache", **kwargs: Any):
    """Resolve ``name``, refuse a model ``what`` cannot reproduce exactly (from its config, before loading any
    weight), then load it. Sliding-window layers are accepted next to full-attention ones (the transformers adapter
    serves them exactly, the profiler leaves them unscored); a model whose every layer slides is refused: it keeps only
    its windows, so there is no budget to spend and no head to score."""
    from sparsemm.errors import UnsupportedModelError
    from sparsemm.loading import load_model
    from sparsemm.model_support import check_supported, sliding_layout
    from sparsemm.resolve import resolve_spec

    config = resolve_spec(name).config()
    check_supported(config, what=what, sliding_ok=True)
    layer_types, window = sliding_layout(config)
    if layer_types is not None and all(kind == "sliding_attention" for kind in layer_types):
        raise UnsupportedModelError(
            f"every layer of this model attends over a sliding window of {window} tokens (sliding-attention layers: "
            f"{len(layer_types)} of {len(layer_types)}), so {what} has no budget to spend and no head to score; use a "
            "model with full-attention layers"
        )
    return load_model(name, **kwargs)


def _plans_for(spec, profile_arg, methods: list[str], budgets: list[int], seeds: list[int], knobs: dict[str, Any]):
    """``(method, plan)`` pairs in table order, all built by ``plan_recipe``; ``None`` plan = stock full cache.
    Each method gets the given knobs it declares; a knob none of the methods declares is refused."""
    from sparsemm.plugin.budgets import method_knobs
    from sparsemm.plugin.knobs import flag_name
    from sparsemm.plugin.recipe import plan_recipe

    given = {k: v for k, v in knobs.items() if v is not None}
    unused = sorted(set(given) - {k for m in methods for k in method_knobs(m)})
    if unused:
        raise SparseMMError(
            f"none of the methods {', '.join(methods)} takes {', '.join(flag_name(k) for k in unused)}; drop it"
        )
    out = []
    for method in methods:
        if method == "full":
            out.append(("full", None))
            continue
        profile = profile_arg if method == "sparsemm" else None
        own = {k: v for k, v in given.items() if k in method_knobs(method)}
        for budget in budgets:
            for seed in seeds if method == "random" else [None]:
                recipe = plan_recipe(spec, method=method, budget=budget, profile=profile, seed=seed, **own)
                out.append((method, recipe.build()))
    return out


def _evaluate_all(loaded, samples, plans, batch: int, title: str, runtime: dict):
    from sparsemm.app.evaluation import evaluate

    results = []
    total = len(samples) * len(plans)
    with Progress(title, total) as advance:
        done = 0
        for method, plan in plans:

            def step(n: int) -> None:
                nonlocal done
                done += n
                advance(done, total)

            results.append(evaluate(loaded, samples, plan, method=method, batch=batch, progress=step, **runtime))
    return results


def _evaluate_and_report(loaded, num, plans, batch, settings, report, plot, title, command) -> None:
    """Evaluate every plan on ``num`` held-out images; print the table, write the JSON report and the plot."""
    from sparsemm.app.report import plot_accuracy, print_table, write_report
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.plugin.recipe import plan_recipe

    recipe = plan_recipe(loaded.spec, method="full")
    runtime = {"max_new_tokens": recipe.max_new_tokens or 12, "page_size": recipe.page_size}
    settings = {**settings, **runtime}
    results = _evaluate_all(loaded, heldout_samples(num), plans, batch, "evaluating", runtime)
    print_table(results, title=title)
    from sparsemm.plugin.attention import auto_choices

    settings["attention_backends"] = auto_choices()  # what "auto" took, and why faster backends were not taken
    for c in settings["attention_backends"]:
        why = "; ".join(f"not {name}: {reason}" for name, reason in c["passed_over"].items())
        click.echo(f"attention backend ({c['device']} {c['dtype']}): {c['chosen']}" + (f" ({why})" if why else ""))
    write_report(report, results, settings, " ".join([command, *sys.argv[2:]]))
    plot_accuracy(plot, results, f"{settings['model']}: accuracy vs KV budget ({num} held-out images)")
    click.echo(f"wrote {report} and {plot}")


@cli.command("run", cls=KnobCommand, knob_exclude=("budget",))
@click.option("--model", "model_name", default="tiny", show_default=True, help="tiny, a known name or a folder")
@click.option("--profile", "profile_arg", help="head profile [the one the model folder ships]")
@click.option("--num", "-n", type=click.IntRange(min=1), default=200, show_default=True, help="held-out images")
@click.option("--budgets", default="24,48,96", show_default=True, help="SparseMM budgets B (window included)")
@click.option("--compare", default="snapkv", show_default=True, help="baselines at the same budgets ('' for none)")
@click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="folder for sparsemm-run.json and sparsemm-run.png",
)
@click.option("--force", is_flag=True, help="overwrite files there that sparsemm did not write")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True)
@click.option(
    "--engine",
    type=click.Path(file_okay=False, path_type=Path),
    help="onnx: a folder from sparsemm-export; its own plan is evaluated (--model/--budgets/--compare do not apply)",
)
def run_cmd(model_name, profile_arg, num, budgets, compare, batch, out, force, backend, engine, **knobs) -> None:
    """The demo: full cache vs SparseMM on held-out OCR images of the shipped tiny model.

    Prints exact match and character accuracy (95% intervals), KV bytes actually held per request and
    tokens/s for the full cache, SparseMM and a uniform baseline at a few budgets; writes a JSON report and a
    plot. About a minute on a laptop CPU. Window, kernel, page size and decode length come from the model
    folder's sparsemm.json (see sparsemm budgets).

    \b
    Examples:
      sparsemm run
      sparsemm run --budgets 12,16,24,32,48,64 --num 500 --out results/
      sparsemm run --backend onnx --engine engine/     # the engine's plan via onnxruntime, without torch
    """
    if (backend == "onnx") != (engine is not None):
        raise SparseMMError("--backend onnx and --engine DIR go together (export one with sparsemm-export)")
    if backend == "onnx":
        if any(v is not None for v in knobs.values()):
            raise SparseMMError("--backend onnx evaluates the engine's own plan: drop the knob flags")
        from sparsemm.app.engine_eval import run_engine

        return run_engine(engine, num=num, batch=batch, out=out, force=force)
    from sparsemm.app.report import check_plot_target, check_report_target

    report = check_report_target(out / "sparsemm-run.json", force)
    plot = check_plot_target(out / "sparsemm-run.png", report, force)
    methods = ["full", "sparsemm", *[m.strip() for m in compare.split(",") if m.strip()]]
    _check_methods(methods)
    loaded = load_supported_model(model_name)
    plans = _plans_for(loaded.spec, profile_arg, methods, _int_list(budgets), [0], knobs)
    first = plans[1][1]
    settings = {
        "model": model_name,
        "num": num,
        "budgets": _int_list(budgets),
        "methods": methods,
        "window": first.window,
        "kernel": first.kernel,
        "profile_sha256": first.profile_sha256,
    }
    _evaluate_and_report(
        loaded,
        num,
        plans,
        batch,
        settings,
        report,
        plot,
        f"{model_name}: {num} held-out images, window {first.window}",
        "sparsemm run",
    )


def _check_methods(methods: list[str]) -> None:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SparseMMError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(sorted(METHODS))}")


@cli.command("eval", cls=KnobCommand, knob_exclude=("budget", "seed"))
@click.option("--model", "model_name", default="tiny", show_default=True, help="tiny or a Qwen2-VL-style model")
@click.option("--profile", "profile_arg", help="head profile for sparsemm [the one the model folder ships]")
@click.option("--methods", default="full,sparsemm,snapkv,pyramidkv,adakv,random", show_default=True)
@click.option("--budgets", default="12,16,24,32,48", show_default=True, help="budgets B (window included)")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds of the random method (averaged)")
@click.option("--num", "-n", type=click.IntRange(min=1), default=500, show_default=True, help="held-out images")
@click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="results JSON")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="PNG [OUT with .png]")
@click.option("--force", is_flag=True, help="overwrite existing files not written by sparsemm")
def eval_cmd(model_name, profile_arg, methods, budgets, seeds, num, batch, out, plot_path, force, **knobs) -> None:
    """Accuracy vs budget for several KV policies, with 95% intervals (random: mean over seeds).

    \b
    Example:
      sparsemm eval --model tiny --methods full,sparsemm,snapkv,adakv,random --budgets 12,16,24 \\
          --num 500 --out results.json
    """
    from sparsemm.app.report import check_plot_target, check_report_target

    report = check_report_target(out, force)
    plot = check_plot_target(plot_path or out.with_suffix(".png"), report, force)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    _check_methods(method_list)
    loaded = load_supported_model(model_name)
    if loaded.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise SparseMMError("sparsemm eval reads the synthetic OCR set with Qwen2-VL-style models (tiny, qwen2-vl)")
    plans = _plans_for(loaded.spec, profile_arg, method_list, _int_list(budgets), _int_list(seeds), knobs)
    shas = {p.profile_sha256 for _, p in plans if p is not None and p.profile_sha256}
    settings = {
        "model": model_name,
        "num": num,
        "budgets": _int_list(budgets),
        "methods": method_list,
        "seeds": _int_list(seeds),
        "window": plans[-1][1].window if plans[-1][1] else None,
        "profile_sha256": shas.pop() if shas else None,
    }
    _evaluate_and_report(
        loaded, num, plans, batch, settings, report, plot, f"{model_name}: {num} held-out images", "sparsemm eval"
    )


# ---------------------------------------------------------------------------------------------- profile
@cli.command("profile")
@click.option("--model", "model_name", default="tiny", show_default=True, help="tiny, a known name, or a model folder")
@click.option("--probes", default="synthetic", show_default=True, help="'synthetic', a probes .jsonl file, or a folder")
@click.option("--num", "-n", type=click.IntRange(min=1), default=256, show_default=True, help="probe images to use")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="skip this many probes first")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="profile file to write")
@click.option(
    "--match",
    type=click.Choice(["official", "decoded", "aligned"]),
    help="token → box rule [aligned for character-level tokenizers, else decoded]",
)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="images per generate call")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="decode length [model folder, else 1024]")
@click.option("--window", type=click.IntRange(min=1), help="window the profile recommends [model folder, else 32]")
@click.option("--kernel", type=click.IntRange(min=1), help="pooling kernel it recommends [model folder, else 5]")
@click.option("--count-base-tokens", is_flag=True, help="LLaVA-NeXT/OneVision: base-grid tokens count as hits too")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=64, show_default=True, help="images")
@click.option("--resume", is_flag=True, help="continue the unfinished run recorded next to --out")
@click.option("--force", is_flag=True, help="overwrite --out / discard an unfinished run")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
def profile_cmd(
    model_name: str,
    probes: str,
    num: int,
    start: int,
    out: Path,
    match: str | None,
    batch: int,
    max_new_tokens: int | None,
    window: int | None,
    kernel: int | None,
    count_base_tokens: bool,
    checkpoint_every: int,
    resume: bool,
    force: bool,
    dtype: str,
    device: str,
) -> None:
    """Score every (layer, head) by how often its top attention lands on the text being read.

    Each probe image is decoded greedily with the prompt "Provide all the OCR results of this image."; every
    generated token that reads one box (--match) credits 1/|R| to the heads whose top-1 key lies in that box's
    image tokens R. The profile is the mean over images. Progress is checkpointed every --checkpoint-every
    images: an interrupted run leaves a valid partial profile at --out and continues with --resume.

    \b
    Probe files (JSONL, one image per line; paths relative to the file):
      {"image": "img/1.png", "boxes": [{"text": "TOTAL", "box": [x0, y0, x1, y1], "chars": [[...], ...]}]}
    A folder holds probes.jsonl, or synthdog-en.json as written by the official SparseMM scripts.

    \b
    Examples:
      sparsemm profile --model tiny --num 256 --out tiny.profile.json
      sparsemm profile --model qwen2-vl --probes synthdog/ --num 1000 --batch 8 --device cuda --dtype bfloat16 \\
          --out qwen2-vl.profile.json
    """
    from sparsemm.app.probe_inputs import default_match, make_encoder, probe_source
    from sparsemm.plugin.recipe import design_default
    from sparsemm.profiles.profiler import ProfileJob, resume_point, run_profile

    loaded = load_supported_model(model_name, what="the profiler's top-1 probe", dtype=dtype, device=device)
    defaults = loaded.spec.defaults
    job = ProfileJob(
        model=loaded.spec.label,
        probes=probes if probes == "synthetic" else str(Path(probes).resolve()),
        num=num,
        match=match or default_match(loaded),
        batch=batch,
        max_new_tokens=max_new_tokens or defaults.max_new_tokens or PROBE_MAX_NEW_TOKENS,
        window=window or defaults.window or design_default("window"),
        kernel=kernel or defaults.kernel or design_default("kernel"),
        extra={"start": start, "count_base_tokens": count_base_tokens, "dtype": dtype},
    )
    encoder = make_encoder(loaded, count_base=count_base_tokens)
    skip = resume_point(out) if resume else 0
    stream = probe_source(probes, num=num - skip, start=start + skip)
    with Progress("profiling", num, skip) as advance:
        profile = run_profile(
            loaded.model,
            loaded.tokenizer,
            encoder,
            stream,
            job,
            out,
            checkpoint_every=checkpoint_every,
            resume=resume,
            force=force,
            progress=advance,
        )
    prov = profile.provenance
    click.echo(
        f"wrote {out}: {prov['images']} images, {prov['scored_tokens']} of {prov['generated_tokens']} generated "
        f"tokens matched a box ({job.match}), {prov['seconds']} s"
    )


# ------------------------------------------------------------------------------------------------- plot
@cli.group("plot", cls=SparseMMGroup)
def plot_group() -> None:
    """Pictures of profiles and budget plans (PNG)."""


@plot_group.command("profile")
@click.argument("profile_arg", metavar="PROFILE")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write [PROFILE.png]")
@click.option("--top", type=float, default=0.05, show_default=True, help="mark the top share of heads")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def plot_profile(profile_arg: str, out: Path | None, top: float, force: bool) -> None:
    """Layers × heads heatmap of a head profile, the top heads marked.

    \b
    Example:  sparsemm plot profile tiny --out tiny-heads.png
    """
    from sparsemm.app.viz import plot_profile_heatmap
    from sparsemm.fileio import check_writable
    from sparsemm.plugin.recipe import load_profile

    profile = load_profile(profile_arg)
    out = out or Path(Path(profile_arg).name + ".png")
    plot_profile_heatmap(profile, check_writable(out, force), top=top)
    click.echo(f"wrote {out}")


@plot_group.command("budgets")
@click.option("--profile", "profile_arg", required=True, help="head profile file (or 'tiny')")
@click.option("--budget", "-B", type=int, required=True, help="average tokens per KV head, window included")
@click.option("--window", "-w", type=int, help="[the profile's recommendation]")
@click.option("--ratio", "-r", type=float, default=0.1, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write [budgets-B.png]")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def plot_budgets(profile_arg: str, budget: int, window: int | None, ratio: float, out: Path | None, force: bool):
    """SparseMM caps per layer and KV head next to the uniform (SnapKV) cap.

    \b
    Example:  sparsemm plot budgets --profile tiny --budget 24 --out caps.png
    """
    from sparsemm.app.viz import plot_plan_caps
    from sparsemm.fileio import check_writable
    from sparsemm.plugin.recipe import plan_recipe

    spec, profile = _model_and_profile(None, profile_arg)
    plan = plan_recipe(spec, method="sparsemm", budget=budget, profile=profile, window=window, ratio=ratio).build()
    out = out or Path(f"budgets-{budget}.png")
    plot_plan_caps(plan, check_writable(out, force))
    click.echo(f"wrote {out}")


cli.add_command(capacity)
cli.add_command(loadtest)
cli.add_command(serve)


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="sparsemm", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
