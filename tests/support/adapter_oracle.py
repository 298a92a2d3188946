"""The transformers adapter against stock ``generate``: the shared helpers of the adapter's exactness tests
(``tests/serving/test_hf_adapter.py``, ``test_families_37.py``): a random head profile, stock and sparsemm runs that
return logits, the dense eviction-by-mask reference run, and the caps a plan keeps outside the window."""

from __future__ import annotations

import numpy as np

from sparsemm.hf_attention import set_text_attention
from sparsemm.plugin.budgets import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.signature import ModelSignature
from sparsemm.serving.hf import generate
from support.reference_impl import EvictionReference

WINDOW, KERNEL, NEW = 4, 3, 6


def random_profile(model, seed: int = 0) -> HeadProfile:
    """A few strong heads, like real profiles."""
    sig = ModelSignature.from_config(model.config)
    scores = np.random.default_rng(seed).random((sig.num_layers, sig.num_heads)) ** 4
    return HeadProfile(scores=tuple(map(tuple, scores.tolist())), signature=sig, window=WINDOW, kernel=KERNEL)


def stock(model, inputs, **kwargs):
    set_text_attention(model, "sdpa")
    return model.generate(**inputs, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs)


def ours(model, inputs, plan, **kwargs):
    return generate(model, inputs, plan, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True,
                    return_cache=True, **kwargs)  # fmt: skip


def max_logit_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.logits, b.logits))


def eviction_reference(model, inputs, caps_fn):
    """Stock generate on the dense cache with the same per-head eviction applied as a mask (independent code)."""
    EvictionReference(caps_fn, WINDOW, KERNEL).register(model)
    return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip


def caps_outside_window(plan: BudgetPlan):
    """``caps_fn`` for ``EvictionReference``: each head's kept tokens outside the window, per prompt length."""

    def caps(layer, prompt_lens):
        kept = plan.kept(np.asarray(prompt_lens))[:, layer]
        return kept - np.minimum(np.asarray(prompt_lens), plan.window)[:, None]

    return caps
