"""The in-process decode comparison (``benchmarks.decode_equal_kept``) compares like with like: every sparsemm arm
holds the dense reference's kept tokens (one per head of rounding at most), and every round yields a ratio."""

from __future__ import annotations

import math

from benchmarks.arms import BUILD, MODEL_CONFIG, kept_budget, save_model
from benchmarks.decode_equal_kept import ARMS, child


def test_every_arm_holds_the_dense_references_kept_tokens_and_each_round_gives_a_ratio() -> None:
    spec = {"allocator": "steady", "prompt": 640, "batch": 2, "rounds": 2, "steps": 2}
    row = child({**spec, "model_dir": str(save_model(BUILD / "model"))})
    heads = MODEL_CONFIG["num_hidden_layers"] * MODEL_CONFIG["num_key_value_heads"] * spec["batch"]
    reference = kept_budget(spec["prompt"]) * heads
    for arm in ARMS:
        assert abs(row["kept_prompt_tokens"][arm] - reference) <= heads, (arm, row["kept_prompt_tokens"])
        ratios = row["ratio_vs_dense"][arm]["rounds"]
        assert len(ratios) == spec["rounds"] and all(math.isfinite(r) and r > 0 for r in ratios)
