"""A random-weight Qwen2-VL-shaped model folder that SGLang and ``sparsemm serve`` load like the shipped one.

The shipped OCR model has 1.2M parameters: per-token work is so small there that fixed per-request costs dominate
every timing. This builds a ~80M-parameter text stack of the same family (12 layers, hidden 768, 12 query / 4 KV
heads of dim 64, M-RoPE) with the shipped tokenizer, image processor and chat template, random weights (seeded),
and a synthetic, skewed head profile (a few heads score high, as in the paper) with the shipped model's
``sparsemm.json`` settings. Its outputs are meaningless; its shapes and costs are what a timing needs.

    python -m benchmarks.random_qwen2vl OUT_DIR        # builds the folder (about 300 MB of fp32 weights)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sparsemm.resolve import resolve_spec

#: The text stack: (layers, hidden, intermediate, query heads, KV heads); head dim = hidden / query heads.
SHAPE = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
         "num_key_value_heads": 4}  # fmt: skip
#: M-RoPE sections (temporal, height, width) of a 64-dim head: they sum to head_dim / 2.
MROPE_SECTION = [8, 12, 12]
#: Files copied unchanged from the shipped model's folder.
COPIED = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja")


def skewed_scores(num_layers: int, num_heads: int, seed: int) -> list[list[float]]:
    """Head scores with a heavy tail (Pareto, shape 1.2): a handful of heads dominate, as the profiler finds."""
    rng = np.random.default_rng(seed)
    return (rng.pareto(1.2, size=(num_layers, num_heads)) + 1e-3).round(6).tolist()


def build(out: Path, seed: int = 0) -> Path:
    """Write the folder ``out`` (created; must not exist) and return it."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from sparsemm.profiles.headprofile import HeadProfile
    from sparsemm.signature import ModelSignature

    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; pass a new folder")
    tiny = resolve_spec("tiny").path
    data = json.loads((tiny / "config.json").read_text())
    text = data["text_config"]
    text.update(SHAPE)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": MROPE_SECTION}
    text["layer_types"] = ["full_attention"] * SHAPE["num_hidden_layers"]
    data["vision_config"]["hidden_size"] = SHAPE["hidden_size"]  # the merger projects into the text stack
    config = Qwen2VLConfig(**{k: v for k, v in data.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    generation = json.loads((tiny / "generation_config.json").read_text())
    model.generation_config = GenerationConfig(
        **{k: v for k, v in generation.items() if k != "transformers_version"}
    )  # fmt: skip
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in COPIED:
        shutil.copy2(tiny / name, staging / name)
    signature = ModelSignature.from_config(model.config)
    defaults = json.loads((tiny / "sparsemm.json").read_text())
    profile = HeadProfile(
        scores=tuple(tuple(row) for row in skewed_scores(signature.num_layers, signature.num_heads, seed)),
        signature=signature,
        window=defaults["window"],
        kernel=defaults["kernel"],
        provenance={"synthetic": f"benchmarks.random_qwen2vl: Pareto(1.2) head scores, seed {seed}"},
    )
    profile.save(staging / defaults["profile"])
    (staging / "sparsemm.json").write_text(json.dumps(defaults, indent=1) + "\n")
    staging.rename(out)  # a half-written folder never carries the final name
    return out


def parameter_count(folder: Path) -> int:
    """Parameters stored in the folder's safetensors file (tied embeddings counted once)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.random_qwen2vl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("out", type=Path, help="the folder to create")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = build(args.out, args.seed)
    print(f"{folder}: {parameter_count(folder) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
