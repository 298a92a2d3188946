"""SparseMM inside SGLang 0.5.23: ``python -m sglang.launch_server --model-path M --kv-policy sparsemm ...``.

This module is the ``sglang.srt.plugins`` entry point that SGLang loads in every one of its processes. It is inert —
it imports nothing heavy and registers nothing — unless ``--kv-policy`` is in the process's arguments (the launcher)
or the resolved configuration is in its environment (the scheduler and detokenizer it spawns). Then
``plugin.install`` checks the pinned SGLang version and every hook target, and registers the policy through
SGLang's own mechanisms only (``HookRegistry``, ``@register_attention_backend``, ``register_radix_cache_backend``).

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


def policy_requested(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether this process serves with ``--kv-policy`` (an argument here, or a configuration inherited)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    return any(a == POLICY_FLAG or a.startswith(POLICY_FLAG + "=") for a in argv) or bool(environ.get(CONFIG_ENV))


def register() -> None:
    """The entry point: install the SparseMM policy when it was asked for, do nothing otherwise."""
    if not policy_requested():
        return
    from sparsemm.serving.sglang.plugin import install

    install()
