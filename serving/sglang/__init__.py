"""SparseMM inside SGLang 0.5.23: ``python -m sglang.launch_server --model-path M --kv-policy sparsemm ...``.

This module is the ``sglang.srt.plugins`` entry point that SGLang loads in every one of its processes. It is inert —
it imports nothing heavy and registers nothing — unless ``--kv-policy`` is in the process's arguments (the launcher)
or the resolved configuration is in its environment (the scheduler and detokenizer it spawns), or the server was
started by ``sparsemm serve`` with its media policy (``media.MEDIA_ENV``, with or without the KV policy). Then
``plugin.install`` checks the pinned SGLang version and every hook target, and registers the policy through
SGLang's own mechanisms only (``HookRegistry``, ``@register_attention_backend``, ``register_radix_cache_backend``).
A process where that fails stops with one line naming the process and the cause, so a server never runs with the
policy installed in some of its processes and not in others.

How the ragged cache lives in SGLang (notes/sglang-head-pool.md): one token slot holds every head of every layer,
so the kept prompt tokens of each (layer, KV head) move into sparsemm's head pool at the end of prefill, the
request's prompt slots before its observation window go back to SGLang's allocator, and decode attends over
head pool ⊕ the window and generated tokens that stay in SGLang's token pool.
"""

from __future__ import annotations

import os
import sys

#: The launcher flag that turns the policy on; everything else is ``--sparsemm-*``.
POLICY_FLAG = "--kv-policy"
#: The resolved configuration, JSON, for the processes the launcher spawns (set by the launcher's hook).
CONFIG_ENV = "SPARSEMM_SGLANG_CONFIG"
#: The media policy of a server started by ``sparsemm serve`` (``media.MediaPolicy``, JSON).
MEDIA_ENV = "SPARSEMM_MEDIA_POLICY"


class FromEnv:
    """A value parsed from an environment variable, re-parsed only when the variable's text changes (each SGLang
    process reads its configuration from the environment the launcher gave it). ``None`` while it is unset."""

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse
        self._cached: tuple[str, object] | None = None

    def __call__(self):
        text = os.environ.get(self.name)
        if not text:
            return None
        if self._cached is None or self._cached[0] != text:
            self._cached = (text, self.parse(text))
        return self._cached[1]


def policy_requested(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether this process serves with ``--kv-policy`` (an argument here, or a configuration inherited)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    return any(a == POLICY_FLAG or a.startswith(POLICY_FLAG + "=") for a in argv) or bool(environ.get(CONFIG_ENV))


def refuse(message: str) -> None:
    """One line on stderr and exit status 2 (SGLang's plugin loader would only log an exception and go on)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def register() -> None:
    """The entry point: install the SparseMM policy and/or the media policy when asked for, nothing otherwise."""
    from_serve = bool(os.environ.get(MEDIA_ENV))
    if not (policy_requested() or from_serve):
        return
    try:
        from sparsemm.serving.sglang.plugin import install
    except Exception as exc:  # a broken install of sparsemm itself: say so here, in every process
        refuse(f"sparsemm cannot be imported in this SGLang process ({type(exc).__name__}: {exc}); reinstall sparsemm")
    install(policy=policy_requested(), media=from_serve)
