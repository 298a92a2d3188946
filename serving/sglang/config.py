"""The ``--kv-policy sparsemm`` flags: parsed from the launcher's arguments, resolved through the one plan path
(``plugin.recipe.plan_recipe``, exactly as the CLI builds plans), and handed to SGLang's other processes as JSON.

No SGLang import here: the flags, the defaults, the head-pool split arithmetic and the per-request budget check are
plain functions, tested without a server.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from sparsemm.errors import SparseMMError
from sparsemm.plugin.knob_flags import add_knob_arguments, knob_values
from sparsemm.plugin.pages import pages_for
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.recipe import PlanRecipe, plan_recipe
from sparsemm.resolve import resolve_spec

POLICY = "sparsemm"
#: The per-request budget key, in ``sampling_params.custom_params`` (OpenAI API: top-level ``custom_params``).
BUDGET_KEY = "sparsemm_budget"
#: The per-request cap on the prompt prefix shared through SGLang's radix cache, in the same place.
SHARE_KEY = "sparsemm_share_len"
#: Output tokens per request the default head-pool split expects (``--sparsemm-head-pool-fraction`` overrides).
EXPECTED_OUTPUT_TOKENS = 128


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglang.launch_server --kv-policy sparsemm", add_help=False, allow_abbrev=False)
    p.add_argument("--kv-policy", choices=[POLICY], required=True)
    p.add_argument("--sparsemm-profile", help="head profile file [the one the model folder ships]")
    p.add_argument("--sparsemm-plan", help="a budget plan file (sparsemm budgets --out); no per-request budgets")
    p.add_argument("--sparsemm-method", help="budget method [sparsemm with a profile]")
    add_knob_arguments(p)  # --sparsemm-budget, --sparsemm-window, ...: every knob the methods declare
    p.add_argument("--sparsemm-max-budget", type=int, help="largest per-request budget [the server's budget]")
    p.add_argument("--sparsemm-head-pool-fraction", type=float, help="share of the KV bytes for the head pool")
    sharing = p.add_mutually_exclusive_group()
    sharing.add_argument(
        "--sparsemm-prefix-sharing", dest="sparsemm_prefix_sharing", action="store_true", default=True,
        help="share uncompressed prompt prefixes through SGLang's radix cache (each request's prefix up to its "
        "observation window); each request's compressed copy stays its own [on]",
    )  # fmt: skip
    sharing.add_argument(
        "--sparsemm-no-prefix-sharing", dest="sparsemm_prefix_sharing", action="store_false",
        help="no radix cache: every request prefills its whole prompt",
    )  # fmt: skip
    return p


@dataclass(frozen=True)
class ServingConfig:
    """What ``--kv-policy sparsemm`` asked for: the plan knobs given (by name; unset ones absent, so the plan
    path's precedence decides) and the serving settings."""

    model_path: str
    method: str | None = None
    profile: str | None = None
    plan: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    max_budget: int | None = None
    head_pool_fraction: float | None = None
    prefix_sharing: bool = True
    tp_size: int = 1  # SGLang's --tp-size: each rank holds the KV heads of its slice (``rank_plan``)

    @property
    def budget(self) -> int | None:
        """The server's budget as given (``--sparsemm-budget``; ``None``: the model folder's)."""
        return self.knobs.get("budget")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingConfig:
        return cls(**json.loads(text))

    # -- resolved once per process ---------------------------------------------------------------------------------
    @cached_property
    def recipe(self) -> PlanRecipe:
        """The plan recipe, built by the same function the CLI uses."""
        spec = resolve_spec(self.model_path)
        return plan_recipe(spec, method=self.method, profile=self.profile, plan=self.plan, **self.knobs)

    @cached_property
    def default_plan(self) -> BudgetPlan:
        plan = self.recipe.build()
        if plan.is_adaptive:
            raise SparseMMError(
                "AdaKV plans split budgets per input at selection time and are refused for serving for now; "
                "use --sparsemm-method sparsemm, snapkv or pyramidkv"
            )
        return plan

    @property
    def obs_window(self) -> int:
        """The resolved observation window (``window`` is the flag, ``None`` when not given)."""
        return self.default_plan.window

    @property
    def per_request_budgets(self) -> bool:
        """A plan file holds caps, not scores: per-request budgets need a profile or a scored method."""
        return self.plan is None and self.default_plan.budget is not None

    @property
    def largest_budget(self) -> int | None:
        """``--sparsemm-max-budget``, or the server's own budget."""
        return self.max_budget if self.max_budget is not None else self.default_plan.budget

    @property
    def page_size(self) -> int:
        """Tokens per head-pool page (``Pp``): the model folder's ``page_size``, else 16."""
        return self.recipe.page_size

    # -- tensor parallelism ----------------------------------------------------------------------------------------
    def check_tp(self) -> None:
        """Each rank must hold whole KV heads of its own: ``--tp-size`` has to divide the model's KV heads."""
        heads = self.default_plan.signature.num_kv_heads
        if self.tp_size < 1 or heads % self.tp_size:
            raise SparseMMError(
                f"--tp-size {self.tp_size} does not divide the model's {heads} KV heads: with --kv-policy {POLICY} "
                f"each rank holds whole KV heads of its own (SGLang would pad or replicate them); use a --tp-size "
                f"that divides {heads}"
            )

    @property
    def kv_heads_per_rank(self) -> int:
        return self.default_plan.signature.num_kv_heads // self.tp_size

    def rank_plan(self, plan: BudgetPlan, rank: int) -> BudgetPlan:
        """``plan`` for the KV heads SGLang gives tensor-parallel ``rank``: ``[rank·n, (rank + 1)·n)``, n = Hkv/tp
        (SGLang's ``QKVParallelLinear`` shards the KV projection this way when tp divides Hkv)."""
        n = self.kv_heads_per_rank
        return plan.head_slice(rank * n, n)

    def request_pages(self, plan: BudgetPlan, prompt_len: int) -> int:
        """Head pages a request at ``plan`` (the whole model's) counts against the pool at admission, in
        rank-independent units: the most any rank's slice takes (every rank computes the same number, so all admit
        the same requests; each rank's own pages never exceed it). With one rank, exactly its pages."""
        return max(
            pages_for(self.rank_plan(plan, r), prompt_len, 0, self.page_size, window_in_pool=False)
            for r in range(self.tp_size)
        )

    def plan_for_budget(self, budget: int | None) -> BudgetPlan:
        return self.default_plan if budget is None or budget == self.default_plan.budget else self.recipe.build(budget)

    def check_budget(self, value: Any) -> int | None:
        """Validate a per-request budget (``custom_params["sparsemm_budget"]``); ``None`` means the default.

        Raises ``ValueError`` (SGLang answers it with HTTP 400) naming the allowed range; never clips."""
        if value is None:
            return None
        if not self.per_request_budgets:
            raise ValueError(
                f"{BUDGET_KEY}: this server runs a fixed budget plan (--sparsemm-plan), which holds caps, not scores; "
                "per-request budgets need a server started with a profile"
            )
        low, high = self.obs_window + 1, self.largest_budget
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f"{BUDGET_KEY} must be an integer from {low} to {high} (tokens kept per KV head, window included; "
                f"the server's --sparsemm-max-budget is {high}), got {value!r}"
            )
        return value

    @staticmethod
    def check_share_len(value: Any) -> int | None:
        """Validate a request's prefix-sharing cap (``custom_params["sparsemm_share_len"]``): ``None`` or an integer
        ≥ 0 (its upper bound, the prompt's length, is checked where the prompt is known). A server that does not
        share prefixes accepts it too: nothing is shared, so any cap holds."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{SHARE_KEY} must be an integer from 0 to the prompt's length (prompt tokens a request may share "
                f"with others through the radix cache), got {value!r}"
            )
        return value

    # -- memory ----------------------------------------------------------------------------------------------------
    def context_len(self) -> int | None:
        """The model's context length from its config (``max_position_embeddings``), if it says."""
        config = resolve_spec(self.model_path).config()
        text = config.get("text_config") or config
        value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
        return int(value) if value else None

    def widest_head(self, context_len: int | None = None) -> int:
        """The most tokens one head keeps outside the window: the largest cap at the largest budget, never more
        than a prompt of ``context_len`` tokens has outside its window."""
        plan = self.plan_for_budget(self.largest_budget)
        if plan.is_full:
            raise SparseMMError("the full method keeps every prompt token; it is not a KV policy to serve")
        widest = int(plan.caps_array().max())
        return min(widest, context_len - plan.window) if context_len else widest

    def max_request_pages(self, context_len: int | None = None) -> int:
        """Head-pool pages of the largest admissible request: Σ over (layer, head) of ⌈min(cap, ctx − w) / Pp⌉ at
        the largest budget (the longest prompt; the window stays in SGLang's token pool); with tensor parallelism
        the largest rank's sum over its heads (``request_pages``' units)."""
        plan = self.plan_for_budget(self.largest_budget)
        if plan.is_full:
            raise SparseMMError("the full method keeps every prompt token; it is not a KV policy to serve")
        caps = plan.caps_array()
        if context_len:
            caps = np.minimum(caps, context_len - plan.window)
        pages = np.ceil(caps / self.page_size).reshape(caps.shape[0], self.tp_size, -1)
        return int(pages.sum(axis=(0, 2)).max())

    def mean_cap_tokens(self) -> float:
        """c̄: the mean over (layer, head) of ⌈cap / Pp⌉·Pp at the default budget (tokens a head keeps in pages)."""
        p = self.page_size
        return float((np.ceil(self.default_plan.caps_array() / p) * p).mean())

    def head_fraction(self) -> float:
        """Share of the KV bytes given to the head pool: the flag, else ``c̄ / (c̄ + w + O)`` with ``O`` =
        ``EXPECTED_OUTPUT_TOKENS`` (each request's steady state: its kept pages, its window and its output)."""
        if self.head_pool_fraction is not None:
            return self.head_pool_fraction
        c = self.mean_cap_tokens()
        return c / (c + self.obs_window + EXPECTED_OUTPUT_TOKENS)

    def split(self, total_tokens: int, slot_page: int) -> tuple[int, int]:
        """``(token-pool slots, head-pool pages)`` for ``--max-total-tokens``-style ``total_tokens``: the token pool
        keeps ``(1 − f)`` of the slots (page aligned); the head pool gets the bytes of the rest. A head-pool page
        holds ``Pp`` tokens of one (layer, KV head), so one token slot's bytes make ``L·Hkv / Pp`` pages (per
        tensor-parallel rank: its ``Hkv / tp`` heads, in each rank's token slots and head pool alike)."""
        sig = self.default_plan.signature
        f = self.head_fraction()
        kept = max(slot_page, (int(total_tokens * (1.0 - f)) // slot_page) * slot_page)
        pages = (total_tokens - kept) * sig.num_layers * self.kv_heads_per_rank // self.page_size
        return kept, pages

    def check_split(self, total_tokens: int, slot_page: int, context_len: int | None = None) -> tuple[int, int]:
        """``split``, refusing a head pool that cannot hold the largest admissible request (it would never run)."""
        kept, pages = self.split(total_tokens, slot_page)
        need = self.max_request_pages(context_len)
        if pages < need:
            f = self.head_fraction()
            sig = self.default_plan.signature
            slots = math.ceil(need * self.page_size / (sig.num_layers * self.kv_heads_per_rank))
            raise SparseMMError(
                f"the head pool gets {pages} pages ({f:.3f} of {total_tokens} token slots), but one request at budget "
                f"{self.largest_budget} needs up to {need}; raise --sparsemm-head-pool-fraction (at least "
                f"{slots / total_tokens:.3f}) or --max-total-tokens, or lower --sparsemm-max-budget"
            )
        return kept, pages


def parse_serving_flags(argv: list[str]) -> tuple[ServingConfig, list[str]]:
    """Split the launcher's arguments into the policy's configuration and SGLang's own arguments."""
    try:
        ours, rest = _parser().parse_known_args(argv)
    except SystemExit:  # argparse already printed why
        raise SparseMMError("bad --kv-policy/--sparsemm-* flags (see the line above)") from None
    model = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    model.add_argument("--model-path", "--model")
    found, _ = model.parse_known_args(rest)
    if not found.model_path:
        raise SparseMMError(
            "--kv-policy sparsemm needs --model-path (a model folder, e.g. $(sparsemm model-path tiny))"
        )
    config = ServingConfig(
        model_path=found.model_path,
        method=ours.sparsemm_method,
        profile=ours.sparsemm_profile,
        plan=ours.sparsemm_plan,
        knobs=knob_values(ours),
        max_budget=ours.sparsemm_max_budget,
        head_pool_fraction=ours.sparsemm_head_pool_fraction,
        prefix_sharing=ours.sparsemm_prefix_sharing,
    )
    if config.plan is not None and (config.profile or config.method or config.budget):
        raise SparseMMError("--sparsemm-plan fixes method, budget and caps: drop --sparsemm-profile/-method/-budget")
    if config.head_pool_fraction is not None and not 0.0 < config.head_pool_fraction < 1.0:
        raise SparseMMError(f"--sparsemm-head-pool-fraction must be in (0, 1), got {config.head_pool_fraction}")
    plan = config.default_plan  # resolves the plan path now: a bad profile or plan fails at start
    if config.max_budget is not None:
        if config.plan is not None:
            raise SparseMMError("--sparsemm-max-budget needs per-request budgets, which a plan file cannot give")
        if config.max_budget <= plan.window:
            raise SparseMMError(f"--sparsemm-max-budget must be above the window {plan.window}")
        if plan.budget is not None and config.max_budget < plan.budget:
            raise SparseMMError(f"--sparsemm-max-budget {config.max_budget} is below the server's budget {plan.budget}")
    config.max_request_pages(config.context_len())
    return config, rest
