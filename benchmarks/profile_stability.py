"""Are the shipped model's visual heads real? Sparsity and agreement between two disjoint probe sets.

    OMP_NUM_THREADS=1 python -m benchmarks.profile_stability --num 256

Profiles the shipped tiny model on probe images ``[0, N)`` and ``[N, 2N)`` (disjoint, and disjoint from evaluation
images), then reports for each profile the share of the total score held by the top 10% of heads (uniform would
be 10%) and the Spearman rank correlation between the two. Writes JSON + a figure (both heatmaps and the scatter).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def profile_range(loaded, start: int, num: int, out: Path):
    from sparsemm.app.probe_inputs import make_encoder, synthetic_probes
    from sparsemm.profiles.profiler import ProfileJob, run_profile

    defaults = loaded.spec.defaults  # the shipped model's sparsemm.json
    job = ProfileJob(
        model=loaded.spec.label,
        probes="synthetic",
        num=num,
        match="aligned",
        batch=32,
        max_new_tokens=defaults.max_new_tokens,
        window=defaults.window,
        kernel=defaults.kernel,
        extra={"start": start},
    )
    return run_profile(
        loaded.model, loaded.tokenizer, make_encoder(loaded), synthetic_probes(num, start), job, out, force=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=256)
    args = parser.parse_args()
    import torch
    from scipy.stats import spearmanr

    from benchmarks.common import write_result
    from sparsemm.app.viz import top_share
    from sparsemm.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        a = profile_range(loaded, 0, args.num, Path(tmp) / "a.json")
        b = profile_range(loaded, args.num, args.num, Path(tmp) / "b.json")
    rho = float(spearmanr(a.array().ravel(), b.array().ravel()).statistic)
    result = {
        "probe_sets": [[0, args.num], [args.num, 2 * args.num]],
        "top10_share": [top_share(a, 0.1), top_share(b, 0.1)],
        "top5_share": [top_share(a, 0.05), top_share(b, 0.05)],
        "uniform_top10_share": 0.1,
        "spearman": rho,
        "scores": [a.array().tolist(), b.array().tolist()],
        "scored_tokens": [a.provenance["scored_tokens"], b.provenance["scored_tokens"]],
    }
    path = write_result(
        "profile_stability", result, f"OMP_NUM_THREADS=1 python -m benchmarks.profile_stability --num {args.num}"
    )
    _plot(a, b, rho, path.with_suffix(".png"))
    print(f"top-10% share {result['top10_share']}, Spearman {rho:.3f}; wrote {path}")


def _plot(a, b, rho: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsemm.app.viz import top_share

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, p, name in ((axes[0], a, "probe set A"), (axes[1], b, "probe set B")):
        im = ax.imshow(p.normalized(), cmap="magma", origin="lower", aspect="auto")
        ax.set_title(f"{name}: top 10% of heads hold {100 * top_share(p, 0.1):.0f}%", fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(p.signature.num_heads))
        ax.set_yticks(range(p.signature.num_layers))
        fig.colorbar(im, ax=ax)
    axes[2].scatter(a.normalized().ravel(), b.normalized().ravel(), s=14)
    axes[2].set_xlabel("score share, set A")
    axes[2].set_ylabel("score share, set B")
    axes[2].set_title(f"Spearman {rho:.2f} over {a.normalized().size} heads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
