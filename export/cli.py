"""``sparsemm-export``: a click group whose default target writes an ONNX engine folder.

``sparsemm-export --model tiny --out engine/`` exports with the model folder's profile and default budget;
``--plan FILE`` or ``--profile/--budget/--method`` choose another plan (``sparsemm.plugin.recipe.plan_recipe``, the
same precedence as ``sparsemm budgets``). User mistakes end with ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from sparsemm.command_group import ReportingGroup
from sparsemm.errors import SparseMMError
from sparsemm.plugin.knob_flags import KnobParams

TARGETS = ("onnx", "tensorrt", "tensorrt-llm")


class ExportGroup(KnobParams, ReportingGroup):
    """``error: <message>`` and exit 2 for user mistakes; Ctrl-C leaves nothing half-written; the budget methods'
    knob flags generated from their declarations."""

    interrupted_message = "interrupted; no engine folder was written"


def _image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT, e.g. 128x64, got {value!r}") from None
    if width < 1 or height < 1:
        raise click.BadParameter("image sizes are positive")
    return width, height


@click.group(
    cls=ExportGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.option("--target", type=click.Choice(TARGETS), default="onnx", show_default=True, help="what to write")
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    help="tiny, llava-1.5, llava-next, llava-next-mistral, qwen2-vl, qwen2.5-vl (local folder or Hugging Face cache, "
    "never downloaded), or a model folder",
)
@click.option("--out", type=click.Path(path_type=Path), help="engine folder to write (refused if not empty)")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path), help="a budget plan file")
@click.option("--profile", help="head profile for the plan [the one the model folder ships]")
@click.option("--method", help="budget method: sparsemm, snapkv, pyramidkv, random, full [sparsemm]")
@click.option(
    "--attention",
    type=click.Choice(["custom", "standard"]),
    default="custom",
    show_default=True,
    help="custom: one SparseMMRaggedDecode node per layer (a TensorRT plugin binds to it); standard: plain ONNX ops",
)
@click.option(
    "--image-size",
    callback=_image_size,
    help="fixed image size WxH of a Qwen2-VL, Qwen2.5-VL or LLaVA-NeXT engine [the model folder's sparsemm.json: "
    "128x64 for tiny]; LLaVA-1.5 reads any image at its processor's crop size",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="weights and KV pool [float32; float16 for --target tensorrt]: onnxruntime runs float32, and float16 with "
    "--attention standard; the float16 custom graph and the bfloat16 graphs (traced in float16, then retyped) are for "
    "TensorRT, checked statically",
)
@click.option("--page-size", type=click.IntRange(min=1), help="KV pool page size [model folder]")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="default decode length [model folder]")
@click.option(
    "--arch",
    type=click.Choice(["sm_90a", "sm_100a"]),
    default="sm_90a",
    show_default=True,
    help="(--target tensorrt) the GPU the plugin kernel's PTX is compiled for",
)
@click.option(
    "--ptx-isa", type=int, help="(--target tensorrt) PTX ISA, e.g. 87 for 8.7 [triton's bundled ptxas's newest]"
)
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="(--target tensorrt-llm) the prompt length the analysis is made for",
)
@click.option("--no-verify", is_flag=True, help="skip the onnxruntime-vs-torch check at the end of the export")
@click.option("--external-data-above", type=click.IntRange(min=0), hidden=True, help="bytes (default 2 GiB − 1)")
@click.option("--force", is_flag=True, help="replace --out if it is not empty; export even past the memory estimate")
@click.pass_context
def export_cli(ctx: click.Context, target: str, model: str, out: Path | None, **options: Any) -> None:
    """Export MODEL with its SparseMM budget plan as a self-describing engine folder.

    The default target, onnx, writes vision.onnx, prefill.onnx (exact prefill + the plan's per-head
    selection) and decode.onnx (one step over the ragged head-paged pool), the plan, tokenizer and processor
    files, and manifest.json (every file's sha256, I/O, geometry, checks). onnxruntime runs it without
    PyTorch: sparsemm run --backend onnx --engine DIR.

    \b
    Examples:
      sparsemm-export --model tiny --out engine/                      # the model folder's profile + budget
      sparsemm-export --model tiny --budget 24 --out engine-b24/
      sparsemm-export --model tiny --plan plan.json --attention standard --out engine-std/
      sparsemm-export --model llava-1.5 --method snapkv --budget 256 --out engine-llava/
      sparsemm-export --model qwen2.5-vl --image-size 448x448 --method snapkv --budget 256 --out engine-qwen25/
    """
    if ctx.invoked_subcommand is not None:
        return
    prompt_tokens = options.pop("prompt_tokens")
    if options["dtype"] is None:  # tensorrt: the plugin's forms, the custom graph in float16 or bfloat16
        options["dtype"] = "float16" if target == "tensorrt" else "float32"
    if target == "tensorrt-llm":
        run_tensorrt_llm_analysis(model, out, prompt_tokens=prompt_tokens, **options)
        return
    if out is None:
        raise SparseMMError("say where to write the engine: --out DIR")
    if target == "tensorrt":
        options["no_verify"] = True
    run_onnx_export(model, out, target=target, **options)


def run_tensorrt_llm_analysis(
    model: str,
    out: Path | None,
    *,
    prompt_tokens: int,
    plan_file: Path | None,
    profile: str | None,
    method: str | None,
    dtype: str,
    page_size: int | None,
    max_new_tokens: int | None,
    force: bool,
    **knobs: Any,
) -> None:
    """``--target tensorrt-llm``: print the analysis (and write it to ``--out``/tensorrt_llm_analysis.json)."""
    from sparsemm.export.memory import DTYPE_BYTES
    from sparsemm.export.tensorrt_llm import analyse, summary
    from sparsemm.fileio import atomic_write_json, check_writable
    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec(model)
    for name in ("attention", "image_size", "no_verify", "external_data_above", "arch", "ptx_isa"):
        knobs.pop(name, None)
    recipe = plan_recipe(
        spec,
        plan=plan_file,
        profile=profile,
        method=method,
        budget=knobs.pop("budget", None),
        page_size=page_size,
        max_new_tokens=max_new_tokens,
        **{k: v for k, v in knobs.items() if v is not None},
    )
    config = spec.config()
    text = config.get("text_config") or config
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    result = analyse(
        recipe.build(),
        head_dim=int(head_dim),
        prompt=prompt_tokens,
        output=recipe.max_new_tokens or 32,
        page_size=recipe.page_size,
        dtype_bytes=DTYPE_BYTES[dtype],
    )
    click.echo(summary(result))
    if out is not None:
        target = out / "tensorrt_llm_analysis.json"
        check_writable(target, force)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, result)
        click.echo(f"wrote {target}")


@export_cli.command("doctor")
@click.option("--require", type=click.Choice(TARGETS), help="exit 2 unless this target is complete here")
@click.option("--json", "as_json", is_flag=True, help="print the diagnosis as JSON")
def doctor_cli(require: str | None, as_json: bool) -> None:
    """What is importable here (onnx, onnxruntime and its extensions, triton, flashinfer, tensorrt, tensorrt_llm,
    torch), the GPUs, and which targets are complete; --require TARGET exits 2 when it is not."""
    import json

    from sparsemm.export.doctor import diagnose, report

    result = diagnose()
    click.echo(json.dumps(result, indent=1) if as_json else report(result))
    if require is not None and not result["targets"][require]["complete"]:
        raise SparseMMError(
            f"target {require} is incomplete here: missing {', '.join(result['targets'][require]['missing'])}"
        )


@export_cli.command("build")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="the largest decode batch the engine takes (its optimization profile: pages and table width "
              "follow from the plan)")  # fmt: skip
@click.option("--jit", is_flag=True, help="prefer the plugin's JIT implementation (Python at run time) over the PTX")
def build_cli(folder: Path, max_batch: int, jit: bool) -> None:
    """Build FOLDER's decode graph into a TensorRT engine (engine.plan), binding the SparseMMRaggedDecode plugin.

    Needs a TensorRT with its builder and a GPU; elsewhere it exits 2 naming what is missing and what the folder
    holds. The manifest records the engine only once engine.plan is written. Never run on a machine with TensorRT's
    builder: see the README's Targets table."""
    from sparsemm.export.doctor import diagnose
    from sparsemm.export.manifest import read_manifest

    manifest = read_manifest(folder)
    missing = diagnose()["targets"]["tensorrt"]["missing"]
    holds = (
        f"{folder} holds a {manifest.get('model', {}).get('family')} {manifest.get('target')} folder, "
        f"{manifest.get('model', {}).get('dtype')}, {manifest.get('attention')} attention"
    )
    if missing:
        raise SparseMMError(
            f"building a TensorRT engine needs {', '.join(missing)}, which this machine lacks; {holds}, and no "
            "engine was built (run this where TensorRT's builder and a GPU are, see sparsemm-export doctor)"
        )
    if manifest.get("target") != "tensorrt":
        raise SparseMMError(f"{holds}; export it with --target tensorrt (the plugin kit) first: no engine was built")
    from sparsemm.export.tensorrt_engine import build_engine, default_limits

    built = build_engine(folder, default_limits(manifest, max_batch), prefer_aot=not jit)
    click.echo(f"wrote {folder / built['plugin']['engine']} (TensorRT {built['plugin']['tensorrt']})")


def run_onnx_export(
    model: str,
    out: Path,
    *,
    plan_file: Path | None,
    profile: str | None,
    method: str | None,
    attention: str,
    dtype: str,
    image_size: tuple[int, int] | None,
    page_size: int | None,
    max_new_tokens: int | None,
    no_verify: bool,
    external_data_above: int | None,
    force: bool,
    target: str = "onnx",
    arch: str = "sm_90a",
    ptx_isa: int | None = None,
    **knobs: Any,
) -> None:
    from sparsemm.export.build import check_target, engine_request, export_engine
    from sparsemm.export.manifest import EXTERNAL_DATA_THRESHOLD

    check_target(out, force)
    request = engine_request(
        model,
        plan=plan_file,
        profile=profile,
        method=method,
        budget=knobs.pop("budget", None),
        page_size=page_size,
        max_new_tokens=max_new_tokens,
        knobs={k: v for k, v in knobs.items() if v is not None},
        attention=attention,
        dtype=dtype,
        image_size=image_size,
        external_data_threshold=EXTERNAL_DATA_THRESHOLD if external_data_above is None else external_data_above,
        verify=not no_verify,
        target=target,
        arch=arch,
        ptx_version=ptx_isa,
    )
    start = time.perf_counter()
    with _StageProgress() as progress:
        export_engine(request, out, force=force, progress=progress)
    plan = request.plan
    budget_text = "full cache" if plan.budget is None else f"B={plan.budget}"
    click.echo(
        f"wrote {out}: {request.spec.label}, {plan.method} {budget_text}, {attention} attention, {dtype}, "
        f"{time.perf_counter() - start:.1f} s"
    )


class _StageProgress:
    """A transient rich spinner naming the export stage (silent when stderr is not a terminal)."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("starting", total=None)
        return lambda stage: self.bar.update(self.task, description=stage)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def main() -> None:
    """Console-script entry point."""
    export_cli.main(prog_name="sparsemm-export", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
