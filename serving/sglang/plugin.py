"""Install the SparseMM policy into SGLang 0.5.23 through its own extension points, and nothing else.

``install()`` refuses any SGLang but the pinned one, then checks that every internal it hooks, subclasses or calls
resolves with the parameters this code relies on — so an upgrade fails at start with one line, not mid-request —
and registers: the ``"sparsemm"`` attention backend (``@register_attention_backend``), a non-sharing radix cache
(``register_radix_cache_backend``) and the ``HookRegistry`` hooks of ``HOOKS``. In the launcher, the
``prepare_server_args`` hook turns ``--kv-policy sparsemm --sparsemm-*`` into the backends' flags and the
configuration the scheduler process reads, and refuses what the policy cannot serve, naming the flag to drop.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsemm.errors import SparseMMError
from sparsemm.serving.sglang import CONFIG_ENV, POLICY_FLAG
from sparsemm.serving.sglang.config import BUDGET_KEY, POLICY, ServingConfig, parse_serving_flags

logger = logging.getLogger("sparsemm")
PINNED_SGLANG = "0.5.23"
BACKEND_NAME = "sparsemm"
#: Flags the launcher hook adds: the policy's own attention and radix-cache backends, no prefix sharing (budgets
#: are per request, so compressed KV is never shared), no CUDA graphs (not captured by this backend yet).
IMPLIED_FLAGS = (
    "--attention-backend", BACKEND_NAME,
    "--radix-cache-backend", BACKEND_NAME,
    "--disable-radix-cache",
    "--disable-cuda-graph",
)  # fmt: skip
#: ServerArgs features the policy refuses at start: (attribute, when it is on, the flag to drop).
REFUSED_FEATURES = (
    ("speculative_algorithm", lambda v: v is not None, "speculative decoding", "--speculative-algorithm"),
    ("enable_dp_attention", bool, "DP attention", "--enable-dp-attention"),
    ("pp_size", lambda v: v and v > 1, "pipeline parallelism", "--pp-size"),
    ("tp_size", lambda v: v and v > 1, "tensor parallelism > 1 (not run by the project yet)", "--tp-size"),
    ("dp_size", lambda v: v and v > 1, "data parallelism", "--dp-size"),
    ("enable_hierarchical_cache", bool, "HiCache", "--enable-hierarchical-cache"),
    ("enable_hisparse", bool, "HiSparse", "--enable-hisparse"),
    ("enable_streaming_session", bool, "streaming sessions", "--enable-streaming-session"),
    ("disaggregation_mode", lambda v: v not in (None, "null"), "PD disaggregation", "--disaggregation-mode"),
)


@dataclass(frozen=True)
class Hook:
    """One ``HookRegistry`` hook: its target, type, the target's leading parameters it relies on, the hook."""

    target: str
    kind: str
    params: tuple[str, ...]
    hook: Callable[..., Any]


def _hooks() -> tuple[Hook, ...]:
    from sparsemm.serving.sglang import scheduling

    return (
        Hook("sglang.srt.server_args.prepare_server_args", "AROUND", ("argv",), around_prepare_server_args),
        Hook("sglang.srt.sampling.sampling_params.SamplingParams.verify", "AFTER", ("self", "vocab_size"),
             after_verify),
        Hook("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget", "AROUND",
             ("self", "budget_bytes", "cap_tokens"), scheduling.split_kv_budget),
        Hook("sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class", "REPLACE", ("self",),
             scheduling.prefill_adder_class),
        Hook("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", "BEFORE", ("self", "running_batch"),
             scheduling.before_prefill_admission),
        Hook("sglang.srt.mem_cache.allocation.alloc_for_extend", "AFTER", ("batch",),
             scheduling.after_alloc_for_extend),
        Hook("sglang.srt.mem_cache.common.checkpoint_kv_cache", "AFTER", ("req", "tree_cache"),
             scheduling.after_checkpoint),
        Hook("sglang.srt.mem_cache.common.release_kv_cache", "AROUND", ("req", "tree_cache", "checkpoint"),
             scheduling.around_release),
        Hook("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
             ".get_internal_state", "AFTER", ("self", "recv_req"), scheduling.after_internal_state),
        Hook("sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor._load_single_item", "AROUND",
             ("data", "modality"), around_load_media),
    )  # fmt: skip


#: Internals the policy subclasses or calls without hooking them, checked the same way.
USED = (
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
     ("self", "req", "has_chunked_req", "truncation_align_size")),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req_ignore_eos", ("self", "req")),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.ceil_paged_tokens", ("self", "tokens")),
    ("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", ("self", "kv", "ranges")),
    ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
     ("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens",
      "extend_prefix_lens", "extend_seq_lens")),
    ("sglang.srt.mem_cache.registry.create_unified_radix_cache", ("ctx", "cache_class")),
    ("sglang.srt.mem_cache.registry.register_radix_cache_backend", ("name", "factory")),
    ("sglang.srt.layers.attention.attention_registry.register_attention_backend", ("name",)),
)  # fmt: skip


def refuse(message: str) -> None:
    """One line on stderr and exit status 2 (SGLang's plugin loader would only log an exception)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_version() -> None:
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        refuse("--kv-policy sparsemm needs SGLang, which is not installed: pip install 'sparsemm[sglang]'")
    if version != PINNED_SGLANG:
        refuse(
            f"--kv-policy sparsemm supports sglang=={PINNED_SGLANG} only (installed: {version}); "
            f"pip install sglang=={PINNED_SGLANG}, or drop --kv-policy"
        )


def check_targets(targets: list[tuple[str, tuple[str, ...]]]) -> None:
    """Every target resolves and starts with the parameters this code relies on; else refuse, naming it."""
    for target, params in targets:
        try:
            obj = pkgutil.resolve_name(target)
            names = tuple(inspect.signature(obj).parameters)
        except Exception as exc:
            refuse(f"SGLang's {target} is gone ({type(exc).__name__}); this sparsemm supports sglang=={PINNED_SGLANG}")
        if names[: len(params)] != params:
            refuse(
                f"SGLang's {target} now takes ({', '.join(names)}), sparsemm expects ({', '.join(params)}); "
                f"this sparsemm supports sglang=={PINNED_SGLANG}"
            )


def install() -> None:
    """Check SGLang and register the policy (every process of a server started with ``--kv-policy``)."""
    check_version()
    hooks = _hooks()
    check_targets([(h.target, h.params) for h in hooks] + list(USED))
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    register_backends()
    for hook in hooks:
        HookRegistry.register(hook.target, hook.hook, HookType[hook.kind])


def register_backends() -> None:
    """The ``"sparsemm"`` attention backend (and its CLI choice) and radix cache (idempotent)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_attention_backend)
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, create_radix_cache)


def create_attention_backend(model_runner):
    from sparsemm.serving.sglang.backend import make_backend_class

    return make_backend_class()(model_runner)


def create_radix_cache(ctx):
    """SGLang's radix cache with sharing off: each request keeps its own compressed KV (budgets are per request),
    while SGLang's row bookkeeping (protected lengths, release, retraction) stays its own."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    ctx.params.disable = True
    return create_unified_radix_cache(ctx)


# -- the launcher's hooks ------------------------------------------------------------------------------------------
def around_prepare_server_args(original, argv, *args, **kwargs):
    argv = list(argv)
    if not any(a == POLICY_FLAG or a.startswith(POLICY_FLAG + "=") for a in argv):
        return original(argv, *args, **kwargs)
    try:
        config, rest = _resolve(argv)
    except SparseMMError as exc:
        refuse(str(exc))
    os.environ[CONFIG_ENV] = config.to_json()
    server_args = original([*rest, *IMPLIED_FLAGS], *args, **kwargs)
    for attribute, active, feature, flag in REFUSED_FEATURES:
        if active(getattr(server_args, attribute, None)):
            refuse(f"--kv-policy sparsemm does not support {feature} yet; drop {flag}")
    total = getattr(server_args, "max_total_tokens", None)
    if total:
        try:
            config.check_split(total, getattr(server_args, "page_size", None) or 1, config.context_len())
        except SparseMMError as exc:
            refuse(str(exc))
    logger.info("sparsemm: --kv-policy sparsemm: CUDA graphs are disabled (this backend does not capture them yet)")
    return server_args


def _resolve(argv: list[str]) -> tuple[ServingConfig, list[str]]:
    from sparsemm.model_support import check_supported
    from sparsemm.resolve import resolve_spec

    config, rest = parse_serving_flags(argv)
    for i, arg in enumerate(rest):
        value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
        if arg.split("=", 1)[0] == "--attention-backend" and value != BACKEND_NAME:
            raise SparseMMError(
                f"--kv-policy {POLICY} brings its own attention backend; drop --attention-backend {value}"
            )
        if arg.split("=", 1)[0] == "--radix-cache-backend" and value != BACKEND_NAME:
            raise SparseMMError(f"--kv-policy {POLICY} brings its own radix cache; drop --radix-cache-backend {value}")
    check_supported(resolve_spec(config.model_path).config(), what=f"--kv-policy {POLICY}")
    return config, rest


_CONFIG: tuple[str, ServingConfig] | None = None


def current_config() -> ServingConfig | None:
    """The configuration of this server process (``None`` before the launcher resolved it)."""
    global _CONFIG
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    if _CONFIG is None or _CONFIG[0] != text:
        _CONFIG = (text, ServingConfig.from_json(text))
    return _CONFIG[1]


def around_load_media(original, *args, **kwargs):
    """An image the server cannot load (a missing file, unreadable bytes) is the client's mistake: answer it with
    HTTP 400 and the reason, as SGLang already does for the failures it classifies, never a bare 500."""
    try:
        return original(*args, **kwargs)
    except RuntimeError as exc:
        if str(exc).startswith("Error while loading data"):
            raise ValueError(str(exc)) from exc
        raise


def after_verify(result, sampling_params, *args, **kwargs):
    """A per-request budget is checked where SGLang checks sampling parameters: a bad one is an HTTP 400 naming
    the allowed range, before the scheduler ever sees the request."""
    config = current_config()
    params = getattr(sampling_params, "custom_params", None) or {}
    if config is not None and BUDGET_KEY in params:
        config.check_budget(params[BUDGET_KEY])
    return result
