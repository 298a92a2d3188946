"""Install the SparseMM policy into SGLang 0.5.23 through its own extension points, and nothing else.

``install()`` refuses any SGLang but the pinned one, then checks that every internal it hooks, subclasses or calls
resolves with the parameters this code relies on — so an upgrade fails at start with one line, not mid-request —
and registers: the ``"sparsemm"`` attention backend (``@register_attention_backend``), a non-sharing radix cache
(``register_radix_cache_backend``: shares uncompressed prompt prefixes, ``radix.py``) and the ``HookRegistry``
hooks. It then applies the hooks and checks that every
one took effect in this process. A process where any of that fails stops the server with one line naming the
process (the HTTP server exits; SGLang stops the whole server when its scheduler or detokenizer exits at start).
In the launcher, the ``prepare_server_args`` hook turns ``--kv-policy sparsemm --sparsemm-*`` into the backends'
flags and the configuration the scheduler process reads, and refuses what the policy cannot serve, naming the flag
to drop. A server started by ``sparsemm serve`` also gets the media hooks (``media.py``), with or without the policy.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sparsemm.errors import SparseMMError
from sparsemm.plugin.knob_flags import sglang_flag
from sparsemm.plugin.knobs import render_error
from sparsemm.serving.sglang import CONFIG_ENV, POLICY_FLAG, FromEnv, refuse
from sparsemm.serving.sglang.config import POLICY, ServingConfig, parse_serving_flags
from sparsemm.serving.sglang.media import check_request_media, current_policy
from sparsemm.serving.sglang.request_fields import body_shape_error, check_custom_params, generate_body_error

logger = logging.getLogger("sparsemm")
PINNED_SGLANG = "0.5.23"
BACKEND_NAME = "sparsemm"
#: Test-only: make the install fail in the named process (``http``, ``scheduler`` or ``detokenizer``).
BREAK_INSTALL_ENV = "SPARSEMM_SGLANG_TEST_BREAK_INSTALL"
#: Flags the launcher hook adds: the policy's own attention and radix-cache backends and no CUDA graphs (not
#: captured by this backend yet); with --sparsemm-no-prefix-sharing also no radix cache (``NO_SHARING_FLAGS``).
IMPLIED_FLAGS = (
    "--attention-backend", BACKEND_NAME,
    "--radix-cache-backend", BACKEND_NAME,
    "--disable-cuda-graph",
)  # fmt: skip
NO_SHARING_FLAGS = ("--disable-radix-cache",)
#: ServerArgs features the policy refuses at start: (attribute, when it is on, the flag to drop).
REFUSED_FEATURES = (
    ("speculative_algorithm", lambda v: v is not None, "speculative decoding", "--speculative-algorithm"),
    ("enable_dp_attention", bool, "DP attention", "--enable-dp-attention"),
    ("pp_size", lambda v: v and v > 1, "pipeline parallelism", "--pp-size"),
    ("dp_size", lambda v: v and v > 1, "data parallelism", "--dp-size"),
    ("enable_hierarchical_cache", bool, "HiCache", "--enable-hierarchical-cache"),
    ("enable_hisparse", bool, "HiSparse", "--enable-hisparse"),
    ("enable_streaming_session", bool, "streaming sessions", "--enable-streaming-session"),
    ("disaggregation_mode", lambda v: v not in (None, "null"), "PD disaggregation", "--disaggregation-mode"),
)


class InstallError(SparseMMError):
    """The policy cannot be installed in this SGLang process (the message says why and what to do)."""


@dataclass(frozen=True)
class Hook:
    """One ``HookRegistry`` hook: its target, type, the target's leading parameters it relies on, the hook."""

    target: str
    kind: str
    params: tuple[str, ...]
    hook: Callable[..., Any]


def _policy_hooks() -> tuple[Hook, ...]:
    """The hooks of ``--kv-policy sparsemm``."""
    from sparsemm.serving.sglang import scheduling

    return (
        Hook("sglang.srt.server_args.prepare_server_args", "AROUND", ("argv",), around_prepare_server_args),
        Hook("sglang.srt.sampling.sampling_params.SamplingParams.verify", "AFTER", ("self", "vocab_size"),
             after_verify),
        Hook("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget", "AROUND",
             ("self", "budget_bytes", "cap_tokens"), scheduling.split_kv_budget),
        Hook("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "BEFORE", ("self", "req"),
             scheduling.before_add_to_queue),
        Hook("sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class", "REPLACE", ("self",),
             scheduling.prefill_adder_class),
        Hook("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", "BEFORE", ("self", "running_batch"),
             scheduling.before_prefill_admission),
        Hook("sglang.srt.mem_cache.allocation.alloc_for_extend", "AFTER", ("batch",),
             scheduling.after_alloc_for_extend),
        Hook("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER", ("batch", "model_runner"),
             scheduling.after_forward_batch_init),
        Hook("sglang.srt.mem_cache.common.checkpoint_kv_cache", "AFTER", ("req", "tree_cache"),
             scheduling.after_checkpoint),
        Hook("sglang.srt.mem_cache.common.release_kv_cache", "AROUND", ("req", "tree_cache", "checkpoint"),
             scheduling.around_release),
        Hook("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
             ".get_internal_state", "AFTER", ("self", "recv_req"), scheduling.after_internal_state),
        Hook("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
             ".is_request_level_customized_info_key", "AROUND", ("self", "key"), around_request_level_key),
        Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager._accumulate_request_meta_info", "AROUND",
             ("meta_info", "state", "key", "values"), around_accumulate_meta_info),
    )  # fmt: skip


def _request_hooks(media: bool) -> tuple[Hook, ...]:
    """What keeps any server we start answering: an empty prompt (which crashes SGLang 0.5.23's scheduler), a
    request SGLang fails to prepare (text and media that do not match, a batch-shaped ``sampling_params`` for one
    prompt: SGLang answers 500 or breaks the stream off) and media it cannot load are HTTP 400s; with ``sparsemm
    serve``'s media policy (``media``), every request's media are checked before SGLang reads them, and again where
    it reads image bytes."""
    hooks = [
        Hook("sglang.srt.entrypoints.api_contract.generate_contract_error", "AFTER", ("body",),
             after_generate_contract),
        Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request", "AROUND",
             ("self", "obj"), around_tokenize_request),
        Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager.create_abort_task", "BEFORE", ("self", "obj"),
             before_create_abort_task),
        Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "BEFORE",
             ("self", "obj", "input_ids"), before_validate_request),
        Hook("sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor._load_single_item", "AROUND",
             ("data", "modality"), around_load_media),
    ]  # fmt: skip
    if media:
        hooks += [
            Hook("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", "BEFORE",
                 ("self", "obj", "request"), before_generate_request),
            Hook("sglang.srt.utils.common.get_image_bytes", "AROUND", ("image_file",), around_get_image_bytes),
        ]  # fmt: skip
    return tuple(hooks)


#: Internals the policy subclasses or calls without hooking them, checked the same way.
USED = (
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
     ("self", "req", "has_chunked_req", "truncation_align_size")),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req_ignore_eos", ("self", "req")),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.ceil_paged_tokens", ("self", "tokens")),
    ("sglang.srt.managers.schedule_batch.Req.set_finish_with_abort", ("self", "error_msg", "status_code", "err_type")),
    ("sglang.srt.managers.schedule_batch.FINISH_ABORT", ("message", "status_code", "err_type")),
    ("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", ("self", "kv", "ranges")),
    ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
     ("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens",
      "extend_prefix_lens", "extend_seq_lens")),
    ("sglang.srt.mem_cache.registry.create_unified_radix_cache", ("ctx", "cache_class")),
    ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.match_prefix", ("self", "params")),
    ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint", ("self", "req")),
    ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache._apply_cache_action", ("self", "action")),
    ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.unlock", ("self", "lock")),
    ("sglang.srt.mem_cache.radix_cache.RadixKey", ("token_ids", "extra_key", "is_bigram", "limit")),
    ("sglang.srt.mem_cache.registry.register_radix_cache_backend", ("name", "factory")),
    ("sglang.srt.layers.attention.attention_registry.register_attention_backend", ("name",)),
)  # fmt: skip


def check_version() -> None:
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise InstallError(
            "--kv-policy sparsemm needs SGLang, which is not installed: pip install 'sparsemm[sglang]'"
        ) from None
    if version != PINNED_SGLANG:
        raise InstallError(
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
            raise InstallError(
                f"SGLang's {target} is gone ({type(exc).__name__}); this sparsemm supports sglang=={PINNED_SGLANG}"
            ) from None
        if names[: len(params)] != params:
            raise InstallError(
                f"SGLang's {target} now takes ({', '.join(names)}), sparsemm expects ({', '.join(params)}); "
                f"this sparsemm supports sglang=={PINNED_SGLANG}"
            )


def process_role() -> str:
    """Which of SGLang's processes this is (``scheduler``, ``detokenizer`` or ``http``), from the call stack:
    SGLang runs the plugins first thing in each process's entry function."""
    roles = {"run_scheduler_process": "scheduler", "run_detokenizer_process": "detokenizer"}
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name in roles:
            return roles[frame.f_code.co_name]
        frame = frame.f_back
    return "http"


ROLE_NAMES = {"http": "HTTP server (launcher)", "scheduler": "scheduler", "detokenizer": "detokenizer"}


def install(*, policy: bool = True, media: bool = False) -> None:
    """Check SGLang and register the policy (``policy``: every process of a ``--kv-policy`` server) and/or the media
    hooks (``media``: a server started by ``sparsemm serve``); any failure stops this process with one line."""
    role = process_role()
    try:
        _install(role, policy=policy, media=media)
    except Exception as exc:
        what = str(exc) if isinstance(exc, SparseMMError) else f"{type(exc).__name__}: {exc}"
        refuse(f"sparsemm did not install in SGLang's {ROLE_NAMES[role]} process: {what}")


def _install(role: str, *, policy: bool, media: bool) -> None:
    if os.environ.get(BREAK_INSTALL_ENV) == role:
        raise RuntimeError(f"made to fail by {BREAK_INSTALL_ENV}={role} (test-only)")
    hooks = _request_hooks(media)
    if policy:
        check_version()
        hooks = _policy_hooks() + hooks
        check_targets(list(USED))
    if media:
        current_policy()  # a malformed policy fails here, at start
    check_targets([(h.target, h.params) for h in hooks])
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if policy:
        register_backends()
    originals = {h.target: pkgutil.resolve_name(h.target) for h in hooks}
    for hook in hooks:
        HookRegistry.register(hook.target, hook.hook, HookType[hook.kind])
    HookRegistry.apply_hooks()  # now, to check the result (SGLang's own later call skips what is applied)
    for target, original in originals.items():
        if pkgutil.resolve_name(target) is original:
            raise InstallError(f"SGLang did not apply the hook on {target} (its log above says why)")


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
    """SGLang's radix cache: with ``--sparsemm-prefix-sharing`` sharing uncompressed prompt prefixes only
    (``radix.py``), else off; either way each request keeps its own compressed KV (budgets are per request) and
    SGLang's row bookkeeping (protected lengths, release, retraction) stays its own."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    config = current_config()
    if config is not None and config.prefix_sharing:
        from sparsemm.serving.sglang.radix import share_cache_class

        return create_unified_radix_cache(ctx, cache_class=share_cache_class())
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
        refuse(render_error(exc, sglang_flag))
    os.environ[CONFIG_ENV] = config.to_json()
    implied = IMPLIED_FLAGS if config.prefix_sharing else IMPLIED_FLAGS + NO_SHARING_FLAGS
    server_args = original([*rest, *implied], *args, **kwargs)
    for attribute, active, feature, flag in REFUSED_FEATURES:
        if active(getattr(server_args, attribute, None)):
            refuse(f"--kv-policy sparsemm does not support {feature} yet; drop {flag}")
    tp_size = int(getattr(server_args, "tp_size", None) or 1)
    if tp_size > 1:  # each rank serves its KV heads' slice of the plan
        config = replace(config, tp_size=tp_size)
        try:
            config.check_tp()
        except SparseMMError as exc:
            refuse(render_error(exc, sglang_flag))
        os.environ[CONFIG_ENV] = config.to_json()
    total = getattr(server_args, "max_total_tokens", None)
    if total:
        try:
            config.check_split(total, getattr(server_args, "page_size", None) or 1, config.context_len())
        except SparseMMError as exc:
            refuse(render_error(exc, sglang_flag))
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
        if arg == "--disable-radix-cache" and config.prefix_sharing:
            raise SparseMMError(
                "--sparsemm-prefix-sharing shares prefixes through the radix cache; drop --disable-radix-cache"
            )
    check_supported(resolve_spec(config.model_path).config(), what=f"--kv-policy {POLICY}")
    return config, rest


#: The configuration of this server process (``None`` before the launcher resolved it).
current_config = FromEnv(CONFIG_ENV, ServingConfig.from_json)


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
    """A request's ``custom_params`` are checked where SGLang checks sampling parameters (``/generate`` and the
    OpenAI endpoints alike): a bad one is an HTTP 400 naming the field, before the scheduler ever sees it."""
    config = current_config()
    if config is not None:
        check_custom_params(getattr(sampling_params, "custom_params", None), config)
    return result


def after_generate_contract(result, body, *args, **kwargs):
    """``/generate``'s body: SGLang's own contract first, then shapes SGLang would fail on, then (with the policy)
    its keys where they do not belong."""
    if result is not None:
        return result
    return body_shape_error(body) or (generate_body_error(body) if current_config() is not None else None)


#: What SGLang raises while preparing a request from a client's malformed input (a text without the image's
#: placeholder, an empty text with an image, a batch-shaped field for one prompt): the client's to fix.
PREPARE_ERRORS = (AssertionError, AttributeError, IndexError, KeyError, TypeError, RuntimeError)


async def around_tokenize_request(original, manager, obj, *args, **kwargs):
    """Tokenizing and preprocessing one request touches nothing but that request, so an exception there is an
    HTTP 400 naming what failed (logged with its traceback, in case it is SGLang's bug), never a 500."""
    try:
        return await original(manager, obj, *args, **kwargs)
    except PREPARE_ERRORS as exc:
        logger.warning("sparsemm: a request could not be prepared; answered with HTTP 400", exc_info=exc)
        raise ValueError(
            f"this request could not be prepared ({type(exc).__name__}: {str(exc)[:200]}); check that the text "
            "has one image placeholder per image sent, and that each field has the type the API documents"
        ) from exc


def before_create_abort_task(manager, obj, *args, **kwargs):
    """A request refused before SGLang normalised it has nothing to abort; SGLang's background abort task would
    raise on it after the answer was sent and break the connection off."""
    if not hasattr(obj, "is_single"):
        obj.is_single = True


def around_request_level_key(original, streamer, key, *args, **kwargs):
    """``meta_info.sparsemm`` is sent once per request (with its first streamed chunk, or its final answer)."""
    from sparsemm.serving.sglang.state import META_KEY

    return key == META_KEY or original(streamer, key, *args, **kwargs)


def around_accumulate_meta_info(original, meta_info, state, key, values, *args, **kwargs):
    """``meta_info.sparsemm`` is one object per request, not a list accumulated over chunks."""
    from sparsemm.serving.sglang.state import META_KEY

    if key != META_KEY:
        return original(meta_info, state, key, values, *args, **kwargs)
    if values:
        meta_info[key] = values[-1]
    return None


def before_validate_request(manager, obj, input_ids, *args, **kwargs):
    """A prompt that tokenizes to nothing is refused (SGLang 0.5.23's scheduler crashes on a 0-token extend)."""
    if input_ids is not None and len(input_ids) == 0 and getattr(obj, "input_embeds", None) is None:
        raise ValueError("the prompt is empty: send some text (or input_ids) to continue from")


def before_generate_request(manager, obj, *args, **kwargs):
    """Every request's media, checked against ``sparsemm serve``'s media policy before SGLang reads any of it."""
    policy = current_policy()
    if policy is not None:
        check_request_media(obj, policy)


def around_get_image_bytes(original, image_file, *args, **kwargs):
    """Where SGLang reads image bytes (any path to it), the media policy again."""
    policy = current_policy()
    if policy is not None:
        policy.check(image_file)
    return original(image_file, *args, **kwargs)
