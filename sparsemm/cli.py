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

from sparsemm.errors import SparseMMError

EXIT_USER_ERROR = 2


class SparseMMGroup(click.Group):
    """Turns ``SparseMMError`` into ``error: <message>`` on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparseMMError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted; outputs already written are complete, nothing half-written was kept", err=True)
            ctx.exit(130)


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
    from sparsemm.profiles.signature import ModelSignature

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
def load_profile_arg(value: str):
    """``tiny`` (the shipped model's profile) or a profile file path."""
    from sparsemm.profiles.headprofile import HeadProfile

    if value == "tiny":
        from sparsemm.resolve import tiny_model_dir

        return HeadProfile.load(tiny_model_dir() / "profile.json")
    return HeadProfile.load(value)


@cli.command("budgets")
@click.option("--profile", "profile_arg", help="head profile file (or 'tiny'); sets the model and default w/kernel")
@click.option("--model", "model_arg", help="model (tiny, name or path) for methods that need no profile")
@click.option("--budget", "-B", type=int, help="average tokens kept per KV head, window included")
@click.option(
    "--method",
    type=click.Choice(["sparsemm", "snapkv", "pyramidkv", "adakv", "random", "full"]),
    default="sparsemm",
    show_default=True,
)
@click.option("--window", "-w", type=int, help="always-kept last prompt tokens [profile's recommendation, else 32]")
@click.option("--ratio", "-r", type=float, default=0.1, show_default=True, help="share of the budget spread uniformly")
@click.option("--kernel", type=int, help="SnapKV pooling kernel [profile's recommendation, else 5]")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random method's scores")
@click.option("--redistribute", is_flag=True, help="give a head's surplus beyond the prompt to the other heads")
@click.option("--skip-short-layers", is_flag=True, help="upstream parity: keep a whole layer when B − w > prompt − w")
@click.option("--json", "as_json", is_flag=True, help="print the plan file to stdout")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the plan file here")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def budgets(
    profile_arg: str | None,
    model_arg: str | None,
    budget: int | None,
    method: str,
    window: int | None,
    ratio: float,
    kernel: int | None,
    seed: int,
    redistribute: bool,
    skip_short_layers: bool,
    as_json: bool,
    out: Path | None,
    force: bool,
) -> None:
    """Turn a head profile into a budget plan: how many prompt tokens each KV head keeps.

    Without --json/--out a summary is printed: per layer the min/median/max cap, the layer's share of all
    kept tokens, and how many heads sit at the floor.

    \b
    Examples:
      sparsemm budgets --profile llava.profile.json --budget 256
      sparsemm budgets --profile tiny --budget 48 --json > plan.json
      sparsemm budgets --model tiny --method snapkv --budget 48 --out snapkv.plan.json
    """
    from sparsemm.fileio import check_writable
    from sparsemm.plugin.budgets import make_plan

    if out is not None:
        check_writable(out, force)
    profile = load_profile_arg(profile_arg) if profile_arg else None
    signature = None
    if model_arg:
        signature = _signature_of(model_arg)
    if profile is None and signature is None:
        raise SparseMMError("say which model: --profile FILE (needed for sparsemm) or --model NAME|PATH")
    plan = make_plan(
        method,
        budget,
        window=window if window is not None else (profile.window if profile else 32),
        kernel=kernel if kernel is not None else (profile.kernel if profile else 5),
        ratio=ratio,
        seed=seed,
        profile=profile,
        signature=signature,
        redistribute=redistribute,
        short_prompt="skip_layer" if skip_short_layers else "per_head",
    )
    if out is not None:
        plan.save(out, force=force)
        click.echo(f"wrote {out}")
    if as_json:
        click.echo(plan.to_json(), nl=False)
    elif out is None:
        from sparsemm.plugin.summary import print_plan_summary

        print_plan_summary(plan)


def _signature_of(model: str):
    from sparsemm.profiles.signature import ModelSignature
    from sparsemm.resolve import resolve_model

    return ModelSignature.from_config(_read_config(resolve_model(model)))


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="sparsemm", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
