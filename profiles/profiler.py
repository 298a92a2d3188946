"""The visual-head profiler (DESIGN §1 "Profile"): probes → per-(layer, query head) scores → ``HeadProfile``.

For each probe image the model decodes greedily. At every step the generated token is matched to the image
region it reads (``matching``); if it reads region R (its image-token positions), every (layer, query head)
whose top-1 attended key lies in R gets ``1/|R|``. An image's score per head is the sum over its steps; the
profile is the mean over images (upstream's reduction). Sliding-window layers are not scored (their heads keep their
window whatever the budget): the profile holds ``null`` for them and normalises over the full-attention layers.

Batched (rows finish independently), memory flat in the number of steps (only the latest step's top-1 keys
are kept), checkpointed every K images into a sidecar so ``--resume`` continues; an interrupted run leaves a
valid partial profile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemm.errors import SparseMMError
from sparsemm.fileio import atomic_write_json, check_writable, read_json
from sparsemm.model_support import sliding_layout
from sparsemm.profiles.attention_probe import ProbeRecorder, enable_probe
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.layouts import ImageLayout
from sparsemm.profiles.matching import make_matcher
from sparsemm.profiles.probe_data import Probe
from sparsemm.signature import ModelSignature

Encoder = Callable[[list[Probe]], tuple[dict[str, torch.Tensor], list[list[ImageLayout]]]]


@dataclass
class HeadScores:
    """Running sums of per-image head scores."""

    sums: np.ndarray  # [L, Hq] float64
    images: int = 0
    scored_steps: int = 0
    steps: int = 0

    def add_image(self, per_image: np.ndarray) -> None:
        self.sums += per_image
        self.images += 1

    def mean(self) -> np.ndarray:
        return self.sums / max(self.images, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sums": self.sums.tolist(),
            "images": self.images,
            "scored_steps": self.scored_steps,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadScores:
        return cls(np.asarray(data["sums"], dtype=np.float64), data["images"], data["scored_steps"], data["steps"])


class _StepHook:
    """A ``StoppingCriteria`` that scores each new token against the probe recorder; never stops generation."""

    def __init__(self, recorder: ProbeRecorder, matchers, layouts, eos_ids: set[int], per_image: np.ndarray, stats):
        self.recorder = recorder
        self.matchers = matchers
        self.layouts = layouts
        self.eos_ids = eos_ids
        self.per_image = per_image  # [B, L, Hq]
        self.done = [False] * len(matchers)
        self.stats = stats

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        top = self.recorder.latest  # [L, B, Hq]: the query that produced this token
        new = input_ids[:, -1].tolist()
        for row, token in enumerate(new):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            self.stats.steps += 1
            boxes = self.matchers[row].region(token)
            if not boxes:
                continue
            region = np.unique(np.concatenate([lay.positions(b) for lay in self.layouts[row] for b in boxes]))
            if region.size == 0:
                continue
            hits = torch.isin(top[:, row], torch.as_tensor(region)).numpy()
            self.per_image[row] += hits / region.size
            self.stats.scored_steps += 1
        return torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)


def score_batch(
    model: torch.nn.Module,
    encoder: Encoder,
    probes: list[Probe],
    tokenizer: Any,
    scores: HeadScores,
    *,
    match: str,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any] | None = None,
) -> None:
    """Decode one batch of probes greedily and add each image's head scores to ``scores``."""
    from transformers import StoppingCriteriaList

    inputs, layouts = encoder(probes)
    sig = scores.sums.shape
    per_image = np.zeros((len(probes), *sig))
    matchers = [make_matcher(match, p, tokenizer) for p in probes]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.pad_token_id}
    layer_types, window = sliding_layout(model)
    sliding = frozenset(i for i, kind in enumerate(layer_types or ()) if kind == "sliding_attention")
    recorder = ProbeRecorder(sig[0], sliding, window)
    hook = _StepHook(recorder, matchers, layouts, eos_ids, per_image, scores)
    with recorder, torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([hook]),
            **(generate_kwargs or {}),
        )
    for row in per_image:
        scores.add_image(row)


@dataclass
class ProfileJob:
    """Everything that defines a profiling run (recorded in the profile and checked on ``--resume``)."""

    model: str
    probes: str
    num: int
    match: str
    batch: int
    max_new_tokens: int
    window: int
    kernel: int
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        return {"model": self.model, "probes": self.probes, "match": self.match, "max_new_tokens": self.max_new_tokens}


def sidecar_path(out: Path) -> Path:
    """The resume file kept next to ``out`` while a profiling run is unfinished."""
    out = Path(out)
    return out.with_name(out.name + ".resume.json")


def resume_point(out: Path) -> int:
    """Probes already done by the unfinished run recorded next to ``out`` (0 if none)."""
    sidecar = sidecar_path(out)
    return int(read_json(sidecar, what="resume file").get("next", 0)) if sidecar.exists() else 0


def run_profile(
    model: torch.nn.Module,
    tokenizer: Any,
    encoder: Encoder,
    probes: Iterable[Probe],
    job: ProfileJob,
    out: Path,
    *,
    checkpoint_every: int = 64,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> HeadProfile:
    """Profile ``job.num`` probes into ``out``; checkpoints go to ``out`` (valid partial profile) + a sidecar."""
    out = Path(out)
    sidecar = sidecar_path(out)
    signature = ModelSignature.from_config(model.config)
    layer_types, window = sliding_layout(model)
    unscored = [i for i, kind in enumerate(layer_types or ()) if kind == "sliding_attention"]
    if unscored and len(unscored) == signature.num_layers:
        raise SparseMMError(
            f"every layer of this model attends over a sliding window of {window} tokens: the profiler scores "
            "full-attention layers only, so there is nothing to profile (use the full method or a uniform budget)"
        )
    start = 0
    scores = HeadScores(np.zeros((signature.num_layers, signature.num_heads)))
    if resume:
        if not sidecar.exists():
            raise SparseMMError(f"nothing to resume: {sidecar} does not exist (run without --resume)")
        state = read_json(sidecar, what="resume file")
        if state["job"] != job.key():
            raise SparseMMError(f"{sidecar} was made by another run ({state['job']}); use the same options or --force")
        scores = HeadScores.from_dict(state["scores"])
        start = state["next"]
    elif sidecar.exists() and not force:
        raise SparseMMError(f"{sidecar} holds an unfinished run: continue it with --resume, or pass --force to restart")
    elif not force:
        check_writable(out)
    enable_probe(model)
    model.eval()
    started = time.perf_counter()
    done = start
    last_checkpoint = start

    def save(partial: bool) -> HeadProfile | None:
        if partial:
            atomic_write_json(sidecar, {"job": job.key(), "next": done, "scores": scores.to_dict()})
        if not (scores.sums > 0).any():  # no hit yet: nothing a profile could say
            return None
        profile = _as_profile(scores, signature, job, partial, time.perf_counter() - started, unscored)
        profile.save(out, force=True)
        return profile

    try:
        for batch in _batches(probes, job.batch):
            score_batch(
                model,
                encoder,
                batch,
                tokenizer,
                scores,
                match=job.match,
                max_new_tokens=job.max_new_tokens,
                generate_kwargs=generate_kwargs,
            )
            done += len(batch)
            if progress:
                progress(done, job.num)
            if done - last_checkpoint >= checkpoint_every and done < job.num:
                save(partial=True)
                last_checkpoint = done
    except KeyboardInterrupt:
        save(partial=True)
        raise
    if scores.images == 0:
        raise SparseMMError("no probe image was processed; check --probes and --num")
    if scores.scored_steps == 0:
        raise SparseMMError(
            f"no generated token matched a probe box with --match {job.match}; the model does not read these probes "
            "(try --match decoded, or probes the model can read)"
        )
    if not (scores.sums > 0).any():
        raise SparseMMError("no attention head ever looked at the region being read; the profile would be all zeros")
    profile = save(partial=False)
    sidecar.unlink(missing_ok=True)
    return profile


def _batches(probes: Iterable[Probe], size: int) -> Iterator[list[Probe]]:
    batch: list[Probe] = []
    for probe in probes:
        batch.append(probe)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _as_profile(
    scores: HeadScores,
    signature: ModelSignature,
    job: ProfileJob,
    partial: bool,
    seconds: float,
    unscored_layers: list[int],
) -> HeadProfile:
    from sparsemm import __version__

    mean = scores.mean()
    provenance = {
        "tool": f"sparsemm {__version__}",
        "probes": job.probes,
        "images": scores.images,
        "requested_images": job.num,
        "partial": partial,
        "match": job.match,
        "max_new_tokens": job.max_new_tokens,
        "generated_tokens": scores.steps,
        "scored_tokens": scores.scored_steps,
        "reduction": "mean over images of Σ_steps 1[top-1 key in R] / |R|",
        "seconds": round(seconds, 1),
        **({"sliding_layers": list(unscored_layers)} if unscored_layers else {}),  # unscored: null in the profile
        **job.extra,
    }
    return HeadProfile.from_array(
        mean,
        signature,
        unscored_layers=unscored_layers,
        window=job.window,
        kernel=job.kernel,
        provenance=provenance,
    )
