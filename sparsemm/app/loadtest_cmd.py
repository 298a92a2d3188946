"""``sparsemm loadtest`` (load an SGLang or OpenAI-compatible server, or compare runs) and ``sparsemm serve``.

The client itself lives in :mod:`sparsemm.serving.loadtest` (no torch, no transformers); this module is the
command line around it: options, progress bar, table, plot, exit status.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from sparsemm.command_group import EXIT_INTERRUPTED
from sparsemm.errors import LoadTestError, SparseMMError
from sparsemm.plugin.knob_flags import KnobCommand
from sparsemm.serving.sglang import CONFIG_ENV, MEDIA_ENV

DEFAULT_CONCURRENCY = 8
DEFAULT_SYNTHETIC = "128,16"


class _RunProgress:
    """A rich progress bar on stderr per phase (warm-up, load); transient, silent when stderr is no terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, finished: int, total: int | None, failed: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total, failed=0)
        self.bar.update(self.tasks[phase], completed=finished, failed=failed)

    def __enter__(self) -> _RunProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


@click.command("loadtest")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--url", help="the server's base URL, e.g. http://127.0.0.1:30000 (load goes nowhere else)")
@click.option(
    "--endpoint",
    type=click.Choice(["generate", "completions", "chat"]),
    default="generate",
    show_default=True,
    help="SGLang /generate, or OpenAI /v1/completions, /v1/chat/completions",
)
@click.option("--concurrency", type=int, help=f"requests kept in flight (closed loop) [{DEFAULT_CONCURRENCY}]")
@click.option("--request-rate", type=float, help="Poisson arrivals, requests/s (with --concurrency: a cap)")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds arrivals and synthetic prompts")
@click.option("--requests", "num_requests", type=int, help="measured requests [100; unbounded with --duration]")
@click.option("--duration", type=float, help="end the measured phase after SECONDS (in-flight requests cancelled)")
@click.option("--warmup", type=int, default=1, show_default=True, help="requests sent first, not measured")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), help="text or .jsonl file")
@click.option(
    "--synthetic",
    help=f"LEN,JITTER: random prompts of LEN±JITTER tokens, counted by the server's /tokenize [{DEFAULT_SYNTHETIC}]",
)
@click.option("--images", "images_dir", type=click.Path(path_type=Path), help="folder of images, one per request")
@click.option("--image-placeholder", help="generate + images: the model's image token text [from the model type]")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="output tokens per request (at most)")
@click.option("--ignore-eos", is_flag=True, help="always generate --max-tokens tokens (as bench_serving does)")
@click.option("--budget", type=int, help="per-request SparseMM budget (custom_params.sparsemm_budget)")
@click.option("--model", help="OpenAI endpoints: the model name to send [the server's first /v1/models entry]")
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="per-request limit (and per probe), seconds"
)
@click.option(
    "--loads-interval", type=float, default=0.5, show_default=True, help="seconds between /v1/loads polls (capacity)"
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the results (JSON) here")
@click.option("--plot", is_flag=True, help="also write a plot (PNG, next to --out)")
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="where the plot goes")
@click.option("--compare", is_flag=True, help="compare result FILES side by side instead of running (table + plot)")
@click.option("--force", is_flag=True, help="overwrite --out / the plot if they exist")
def loadtest(
    files: tuple[Path, ...],
    url: str | None,
    endpoint: str,
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    num_requests: int | None,
    duration: float | None,
    warmup: int,
    prompts_file: Path | None,
    synthetic: str | None,
    images_dir: Path | None,
    image_placeholder: str | None,
    max_tokens: int,
    ignore_eos: bool,
    budget: int | None,
    model: str | None,
    timeout: float,
    loads_interval: float,
    out: Path | None,
    plot: bool,
    plot_out: Path | None,
    compare: bool,
    force: bool,
) -> None:
    """Load-test a served model: throughput, TTFT, inter-token and end-to-end latency percentiles, errors.

    Streams every request and times each chunk. --concurrency N keeps N requests in flight; --request-rate R
    sends Poisson arrivals (seeded). The run ends after --requests or --duration; Ctrl-C stops it and still
    writes what was measured. Failures (refused connections, timeouts, HTTP errors) are counted by kind, never
    fatal. Against a sparsemm SGLang server the SparseMM stats (kept tokens, head pages) are reported before and
    after. `generate` sends the prompt text as is (use the model's own prompt format, if it matters to you).

    Synthetic prompts are counted in the model's tokens, like bench_serving's random dataset: a seeded corpus of
    common words is tokenized once by the server (/tokenize), and each request takes LEN±JITTER of those token
    ids; generate and completions send them as token ids, chat (and generate with --images) their text. A 4xx
    answer, or an error event whose code is 4xx, counts as client_error with the server's message; 5xx as
    server_error. Every run ends by --duration, or --timeout after its last request; Ctrl-C stops it at once.

    \b
    Examples:
      sparsemm loadtest --url http://127.0.0.1:30000 --concurrency 8 --requests 200 --out full.json
      sparsemm loadtest --url http://127.0.0.1:30000 --endpoint chat --images pics/ --request-rate 4 \\
          --duration 60 --max-tokens 64 --ignore-eos --budget 256 --out sparsemm.json --plot
      sparsemm loadtest --compare full.json sparsemm.json
    """
    if compare:
        if out is not None:
            raise LoadTestError("--compare writes no results file; its plot goes to --plot-out")
        _compare(files, url, plot_out, force)
        return
    if files:
        raise LoadTestError("result FILES are only read with --compare; a run needs --url (see --help)")
    if url is None:
        raise LoadTestError("say which server to load: --url http://HOST:PORT (or --compare A.json B.json)")
    from sparsemm.app.loadtest_report import plot_result, print_result
    from sparsemm.fileio import check_writable
    from sparsemm.serving.loadtest import (
        LoadTestSettings,
        Workload,
        build_result,
        load_images,
        load_prompts,
        parse_synthetic,
        run_load_test,
        write_result,
    )
    from sparsemm.serving.loadtest.protocol import check_images_supported
    from sparsemm.serving.loadtest.runner import import_aiohttp
    from sparsemm.serving.loadtest.settings import DEFAULT_REQUESTS

    if images_dir is not None:
        check_images_supported(endpoint, True)  # before reading any image
    if prompts_file is not None and synthetic is not None:
        raise LoadTestError("give the prompts one way: --prompts FILE or --synthetic LEN,JITTER")
    if plot_out is not None:
        plot = True
    settings = LoadTestSettings(
        url=url,
        endpoint=endpoint,
        concurrency=concurrency if (concurrency is not None or request_rate is not None) else DEFAULT_CONCURRENCY,
        request_rate=request_rate,
        seed=seed,
        requests=num_requests if (num_requests is not None or duration is not None) else DEFAULT_REQUESTS,
        duration_s=duration,
        warmup=warmup,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        budget=budget,
        timeout_s=timeout,
        model=model,
        image_placeholder=image_placeholder,
        loads_interval_s=loads_interval,
    )
    if out is not None:
        check_writable(out, force)
    plot_path = None
    if plot:
        default_plot = out.with_suffix(".png") if out else Path("sparsemm-loadtest.png")
        plot_path = check_writable(plot_out or default_plot, force)
    import_aiohttp()  # a missing client library is reported before anything is read or sent
    workload = Workload(
        prompts=load_prompts(prompts_file) if prompts_file is not None else None,
        synthetic=None if prompts_file is not None else parse_synthetic(synthetic or DEFAULT_SYNTHETIC),
        images=load_images(images_dir) if images_dir is not None else (),
        seed=seed,
    )
    with _RunProgress() as progress:
        outcome = run_load_test(settings, workload, progress)
    result = build_result(settings, workload, outcome, shlex.join(["sparsemm", *sys.argv[1:]]))
    print_result(result)
    written = []
    if out is not None:
        written.append(str(write_result(out, result, force=True)))  # checked before the run
    if plot_path is not None:
        title = f"{url} {endpoint}: {result['metrics']['completed']} requests"
        written.append(str(plot_result(plot_path, result, title)))
    if written:
        click.echo(f"wrote {' and '.join(written)}")
    if outcome.stopped_by == "interrupted":
        click.echo("interrupted: the results above cover what was measured before Ctrl-C", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if result["metrics"]["completed"] == 0:
        kind = next(iter(result["errors"]), "no request")
        hint = f"is the server up at {url}?" if kind == "connection" else "see the errors above"
        raise LoadTestError(f"no request completed ({kind}); {hint}")


def _compare(files: tuple[Path, ...], url: str | None, plot_out: Path | None, force: bool) -> None:
    from sparsemm.app.loadtest_report import comparison_plot_problem, plot_comparison, print_comparison, result_labels
    from sparsemm.fileio import check_writable
    from sparsemm.serving.loadtest import load_result

    if url is not None:
        raise LoadTestError("--compare reads result files and sends nothing; drop --url")
    if len(files) < 2:
        raise LoadTestError("--compare needs two or more result files: sparsemm loadtest --compare a.json b.json")
    plot_path = check_writable(plot_out or Path("sparsemm-loadtest-compare.png"), force)
    results = [load_result(path) for path in files]
    labels = result_labels(list(files))
    print_comparison(results, labels)
    problem = comparison_plot_problem(results, labels)
    if problem is not None:
        click.echo(problem, err=True)
        return
    plot_comparison(plot_path, results, labels)
    click.echo(f"wrote {plot_path}")


# ------------------------------------------------------------------------------------------------ serve
SGLANG_DEFAULT_HOST, SGLANG_DEFAULT_PORT = "127.0.0.1", "30000"
#: What SGLang needs on a CPU-only machine (tests/sglang_support/README.md): its CPU model runner, and the
#: vision tower's and image processor's CPU paths (their default backends are GPU-only). The KV pool is capped:
#: sized from free RAM it would take most of the machine's memory for a try-out; an idle scheduler sleeps.
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_FLAGS = (
    "--device", "cpu",
    "--mm-attention-backend", "sdpa",
    "--image-processor-backend", "pil",
    "--max-total-tokens", "16384",
    "--sleep-on-idle",
)  # fmt: skip


def serve_command(
    model_path: Path,
    policy: str,
    method: str | None,
    knobs: dict[str, Any],
    extra: tuple[str, ...],
    cuda: bool,
    prefix_sharing: bool | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The ``sglang.launch_server`` command line and the environment variables it needs on top of ours."""
    from sparsemm.plugin.knob_flags import sglang_flag

    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
    if policy == "sparsemm":
        cmd += ["--kv-policy", "sparsemm"]
        if method is not None:
            cmd += ["--sparsemm-method", method]
        if prefix_sharing is not None:
            cmd += ["--sparsemm-prefix-sharing" if prefix_sharing else "--sparsemm-no-prefix-sharing"]
        for name, value in knobs.items():
            if value is not None:
                cmd += [sglang_flag(name), str(value)]
    env = {}
    if not cuda:
        cmd += CPU_FLAGS
        env.update(CPU_ENV)
        tp = _flag_value(list(extra), "--tp-size", _flag_value(list(extra), "--tp", "1"))
        if tp.isdigit() and int(tp) > 1 and THREADS_BIND_ENV not in os.environ:
            binding = cpu_thread_binding(int(tp), sorted(os.sched_getaffinity(0)))
            if binding:
                env[THREADS_BIND_ENV] = binding
    return cmd + list(extra), env


#: SGLang's CPU engine binds each tensor-parallel rank's threads to these cores (``"0-3|4-7"``); unset, it wants a
#: NUMA node per rank and refuses ``--tp-size 2`` on a one-node machine.
THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"


def cpu_thread_binding(ranks: int, cores: list[int]) -> str | None:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` ranks its own run of consecutive ``cores`` (None
    when there are fewer cores than ranks, or a share would not be consecutive: SGLang then says what it needs)."""
    if len(cores) < ranks:
        return None
    share = len(cores) // ranks
    groups = [cores[r * share : (r + 1) * share] for r in range(ranks)]
    if any(g[-1] - g[0] != len(g) - 1 for g in groups):
        return None
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def is_loopback(host: str) -> bool:
    """Whether a bind address stays on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _flag_value(args: list[str], flag: str, default: str) -> str:
    """The last value given to ``flag`` (``--flag V`` or ``--flag=V``), as argparse would read it."""
    value = default
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def sglang_import_problem(env: dict[str, str]) -> str | None:
    """Why ``sglang.launch_server`` does not import in this interpreter with ``env`` (None: it does)."""
    try:
        check = subprocess.run(
            [sys.executable, "-c", "import sglang.launch_server"], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "importing it took over 300 s"
    if check.returncode == 0:
        return None
    lines = [line for line in check.stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {check.returncode}"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@click.command("serve", cls=KnobCommand, context_settings={"ignore_unknown_options": True})
@click.option("--model", "model_name", default="tiny", show_default=True, help="tiny, a known name or a folder")
@click.option(
    "--policy",
    type=click.Choice(["sparsemm", "full"]),
    default="sparsemm",
    show_default=True,
    help="KV policy: SparseMM head budgets, or SGLang's stock full cache (the baseline)",
)
@click.option("--method", help="budget method: sparsemm, snapkv, pyramidkv, random [sparsemm with a profile]")
@click.option(
    "--allow-local-media",
    "local_media",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="let requests name image/video/audio files under DIR (repeatable) [no local files]",
)
@click.option(
    "--allow-media-urls", "media_urls", metavar="DOMAINS", help="host names media URLs may be fetched from [none]"
)
@click.option(
    "--prefix-sharing/--no-prefix-sharing",
    default=None,
    help="share uncompressed prompt prefixes (system prompts, the same image, earlier turns) through SGLang's "
    "radix cache; each request keeps its own compressed copy [on]",
)
@click.option("--print", "print_only", is_flag=True, help="print the command and exit")
@click.argument("sglang_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    model_name: str,
    policy: str,
    method: str | None,
    prefix_sharing: bool | None,
    local_media: tuple[Path, ...],
    media_urls: str | None,
    print_only: bool,
    sglang_args: tuple[str, ...],
    **knobs: Any,
) -> None:
    """Serve MODEL with SGLang and the SparseMM KV policy (runs python -m sglang.launch_server).

    Arguments after -- go to SGLang unchanged (--port, --tp, --mem-fraction-static, ...; given twice, the last
    wins). Without a GPU the CPU settings are added: SGLANG_USE_CPU_ENGINE=1, --device cpu, CPU vision and image
    backends and a 16k-token KV pool (--max-total-tokens). Then load it from another shell. For a fair comparison
    of policies, give both servers the same memory (--max-total-tokens).

    The plan flags (--method, --budget, --window, --ratio, ... every knob a budget method declares) are those of
    sparsemm budgets; they go to SGLang as --sparsemm-*, and the plan is resolved here first, so a mistake is
    named in these flags before SGLang starts.

    Safe by default, with either policy: requests send media inline (base64 or data: URLs); a local path, a
    file:// URL or a remote URL is refused with HTTP 400 unless --allow-local-media DIR or --allow-media-urls
    DOMAINS allows it (SGLang alone would read any file and fetch any URL a client names). Serving beyond
    127.0.0.1 without SGLang's --api-key prints a warning.

    \b
    Examples:
      sparsemm serve --model tiny --budget 48
      sparsemm loadtest --url http://127.0.0.1:30000 --max-tokens 16
    \b
      sparsemm serve --model qwen2-vl --budget 256 -- --port 30001 --mem-fraction-static 0.8
      sparsemm serve --model qwen2-vl --policy full -- --port 30002      # the baseline, same memory
      sparsemm serve --model tiny --method snapkv --budget 32 -w 8       # a uniform baseline at the same budget
      sparsemm serve --model tiny --print                                # show the command only
      sparsemm serve --model tiny --allow-local-media ./pics -- --host 0.0.0.0 --api-key "$KEY"
    """
    from sparsemm.plugin.knobs import flag_name, render_error
    from sparsemm.resolve import resolve_model
    from sparsemm.serving.sglang.config import parse_serving_flags
    from sparsemm.serving.sglang.media import MediaPolicy

    given = sorted(flag_name(k) for k, v in knobs.items() if v is not None) + (["--method"] if method else [])
    given += [] if prefix_sharing is None else ["--prefix-sharing" if prefix_sharing else "--no-prefix-sharing"]
    if given and policy != "sparsemm":
        them = "it" if len(given) == 1 else "them"
        raise SparseMMError(f"{', '.join(given)}: SparseMM policy settings; drop {them} with --policy full")
    cmd, env_add = serve_command(
        resolve_model(model_name), policy, method, knobs, sglang_args, _cuda_available(), prefix_sharing
    )
    if policy == "sparsemm":  # resolve the plan here, so a mistake names this command's flags, before SGLang starts
        try:
            parse_serving_flags(cmd[3:])
        except SparseMMError as exc:
            raise SparseMMError(render_error(exc)) from None
    # sparsemm's plugin reads the media policy in every SGLang process, with either policy
    env_add[MEDIA_ENV] = MediaPolicy.allowing([str(d) for d in local_media], media_urls).to_json()
    shown = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env_add.items()), shlex.join(cmd)])
    host = _flag_value(cmd, "--host", SGLANG_DEFAULT_HOST)
    port = _flag_value(cmd, "--port", SGLANG_DEFAULT_PORT)
    if not is_loopback(host) and _flag_value(cmd, "--api-key", "") == "":
        click.echo(
            f"warning: serving on {host} (beyond this machine) without --api-key: anyone who reaches port {port} can "
            'use the model; add -- --api-key "$KEY" (clients send Authorization: Bearer $KEY)',
            err=True,
        )
    if print_only:
        click.echo(shown)
        return
    # a configuration inherited from another server's environment would turn the policy on in a plain one
    env = {**{k: v for k, v in os.environ.items() if k != CONFIG_ENV}, **env_add}
    problem = sglang_import_problem(env)
    if problem is not None:
        raise SparseMMError(
            f"SGLang does not import in {sys.executable} ({problem}); on a GPU machine: pip install "
            '"sparsemm[sglang]"; on a CPU machine: bash tests/sglang_support/install.sh VENV and put '
            "tests/sglang_support/pythonpath on PYTHONPATH (see tests/sglang_support/README.md)"
        )
    click.echo(f"{shown}\nthen, from another shell: sparsemm loadtest --url http://{host}:{port}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
