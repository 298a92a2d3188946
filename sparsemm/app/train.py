"""Seeded, resumable trainer for the tiny OCR Qwen2-VL.

    python -m sparsemm.app.train --out runs/tiny_ocr            # train (or resume) in runs/tiny_ocr
    python -m sparsemm.app.train --out runs/tiny_ocr --export models/tiny_ocr   # ship the last checkpoint

Plain next-token loss from random init sits on a long plateau (notes/tiny-ocr-training.md). Four auxiliary
losses on the vision tower's merged image tokens break it, from step 0; they train throwaway heads only,
so the shipped checkpoint is a standard ``Qwen2VLForConditionalGeneration``:

* which character the token's 8×8 cell shows (most glyph overlap; "none" for background),
* that character's index in the string, and the character before it (induction-friendly keys),
* alignment: the token, read through the tied ``lm_head``, should predict the character's token id.

Batches are a pure function of the step number (seeds ``TRAIN_SEED_BASE + step·batch + i``), so a resumed run
sees exactly the data an uninterrupted one would. Validation uses held-out seeds from the top of the held-out
range, leaving the bottom (which ``sparsemm run``/``eval`` report on) untouched by model selection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sparsemm.fileio import atomic_write, atomic_write_json
from sparsemm.models.ocr_data import (
    CHARSET,
    HELDOUT_SEEDS,
    MAX_CHARS,
    TRAIN_SEED_BASE,
    OcrSample,
    heldout_texts,
    render_sample,
    sample_text,
)
from sparsemm.models.tiny_ocr import (
    MERGE_SIZE,
    PATCH_SIZE,
    build_config,
    build_image_processor,
    build_tokenizer,
    encode_ocr_batch,
)

CELL = PATCH_SIZE * MERGE_SIZE  # pixels per image token side
MIN_OVERLAP = 8  # px² of glyph box inside a cell for the cell to count as showing that glyph
VALIDATION_START = HELDOUT_SEEDS - 512


@dataclass
class TrainConfig:
    seed: int = 0
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 12_000
    decay_start: float = 0.7  # fraction of max_steps where the cosine decay to 5% begins
    aux_weight: float = 1.0
    eval_every: int = 250
    ckpt_every: int = 250
    target_exact: float = 0.9
    target_char: float = 0.97


class AuxHeads(nn.Module):
    """Throwaway per-image-token classifiers (not part of the shipped model)."""

    def __init__(self, hidden: int):
        super().__init__()
        n = len(CHARSET)
        self.char = nn.Linear(hidden, n + 1)  # + none
        self.ordinal = nn.Linear(hidden, MAX_CHARS + 1)  # + none
        self.prev = nn.Linear(hidden, n + 2)  # + start + none


def cell_targets(samples: list[OcrSample], grid_h: int, grid_w: int) -> torch.Tensor:
    """Per image token: (char idx, ordinal, prev char idx), -1 where the cell shows no glyph. [N·h·w, 3]."""
    n_chars = len(CHARSET)
    out = torch.full((len(samples), grid_h, grid_w, 3), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        best = torch.zeros(grid_h, grid_w)
        for k, (x0, y0, x1, y1) in enumerate(s.char_boxes):
            for r in range(max(0, y0 // CELL), min(grid_h, (y1 - 1) // CELL + 1)):
                for c in range(max(0, x0 // CELL), min(grid_w, (x1 - 1) // CELL + 1)):
                    ov = (min(x1, (c + 1) * CELL) - max(x0, c * CELL)) * (min(y1, (r + 1) * CELL) - max(y0, r * CELL))
                    if ov >= MIN_OVERLAP and ov > best[r, c]:
                        best[r, c] = ov
                        prev = CHARSET.index(s.text[k - 1]) if k else n_chars
                        out[i, r, c] = torch.tensor([CHARSET.index(s.text[k]), k, prev])
    return out.view(-1, 3)


def training_samples(step: int, batch: int) -> list[OcrSample]:
    """The samples of training step ``step`` (held-out strings skipped)."""
    excluded = heldout_texts()
    first = TRAIN_SEED_BASE + step * batch
    return [render_sample(s) for s in range(first, first + batch) if sample_text(s) not in excluded]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = int(cfg.decay_start * cfg.max_steps)
    if step < start:
        return cfg.lr
    t = min(1.0, (step - start) / max(1, cfg.max_steps - start))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def teacher_forced_accuracy(model, tokenizer, image_processor, samples: list[OcrSample], batch: int = 64):
    """(exact match, char accuracy) with teacher forcing: a string is exact iff every answer argmax is right,
    which equals greedy exact match (each step's input is then the model's own previous output)."""
    model.eval()
    exact = chars = total_chars = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = encode_ocr_batch([s.image for s in chunk], tokenizer, image_processor, [s.text for s in chunk])
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1]
        target = labels[:, 1:]
        hit = (logits.argmax(-1) == target) | (target == -100)
        exact += int(hit.all(-1).sum())
        answer = target != -100
        # character accuracy excludes the end token: the last labelled position of each row
        last = answer.cumsum(-1) == answer.sum(-1, keepdim=True)
        char_pos = answer & ~last
        chars += int((hit & char_pos).sum())
        total_chars += int(char_pos.sum())
    model.train()
    return exact / len(samples), chars / total_chars


def _param_groups(modules, weight_decay: float):
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(out: Path, cfg: TrainConfig, max_minutes: float | None = None) -> dict:
    """Train (resuming from ``out/ckpt.pt`` if present) until the targets, ``max_steps`` or the time limit."""
    from transformers import Qwen2VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer, image_processor = build_tokenizer(), build_image_processor()
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer))
    aux = AuxHeads(model.config.text_config.hidden_size)
    opt = torch.optim.AdamW(_param_groups([model, aux], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    step, history, elapsed = 0, [], 0.0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    char_token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(CHARSET)) + [tokenizer.pad_token_id])
    validation = [render_sample(s) for s in range(VALIDATION_START, VALIDATION_START + 512)]

    merged: dict[str, torch.Tensor] = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: merged.__setitem__("x", o))
    model.train()
    t0, tick = time.time() - elapsed, time.time()
    result = {"stopped": "max_steps"}
    try:
        while step < cfg.max_steps:
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            samples = training_samples(step, cfg.batch)
            inputs = encode_ocr_batch([s.image for s in samples], tokenizer, image_processor, [s.text for s in samples])
            _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
            targets = cell_targets(samples, gh // MERGE_SIZE, gw // MERGE_SIZE)
            lm = model(**inputs).loss
            h = merged["x"]
            none = targets[:, 0] < 0
            char_t = torch.where(none, len(CHARSET), targets[:, 0])
            ord_t = torch.where(none, MAX_CHARS, targets[:, 1])
            prev_t = torch.where(none, len(CHARSET) + 1, targets[:, 2])
            ce = nn.functional.cross_entropy
            aux_loss = ce(aux.char(h), char_t) + ce(aux.ordinal(h), ord_t) + ce(aux.prev(h), prev_t)
            aux_loss = aux_loss + ce(model.lm_head(h), char_token_ids[char_t])
            loss = lm + cfg.aux_weight * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            step += 1
            if step % 25 == 0:
                rate = 25 / (time.time() - tick)
                tick = time.time()
                print(
                    f"step {step} lm {lm.item():.3f} aux {aux_loss.item():.3f} "
                    f"lr {learning_rate(cfg, step):.2e} {rate:.2f} steps/s",
                    flush=True,
                )
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                em, ca = teacher_forced_accuracy(model, tokenizer, image_processor, validation)
                history.append(
                    {
                        "step": step,
                        "minutes": round((time.time() - t0) / 60, 2),
                        "lm_loss": round(lm.item(), 4),
                        "exact": em,
                        "char_acc": ca,
                    }
                )
                print(f"eval step {step}: exact {em:.3f} char {ca:.3f}", flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                _save(ckpt, model, aux, opt, step, history, time.time() - t0, cfg)
            if (
                history
                and history[-1]["step"] == step
                and history[-1]["exact"] >= cfg.target_exact
                and history[-1]["char_acc"] >= cfg.target_char
            ):
                _save(ckpt, model, aux, opt, step, history, time.time() - t0, cfg)
                result = {"stopped": "target reached"}
                break
            if max_minutes is not None and time.time() - t0 > max_minutes * 60:
                _save(ckpt, model, aux, opt, step, history, time.time() - t0, cfg)
                result = {"stopped": "time limit"}
                break
    except KeyboardInterrupt:
        _save(ckpt, model, aux, opt, step, history, time.time() - t0, cfg)
        result = {"stopped": "interrupted"}
    finally:
        hook.remove()
    result.update(step=step, minutes=round((time.time() - t0) / 60, 1), last=history[-1] if history else None)
    atomic_write_json(out / "train_log.json", {"config": asdict(cfg), "history": history, **result})
    return result


def _save(path: Path, model, aux, opt, step, history, elapsed, cfg) -> None:
    state = {
        "model": model.state_dict(),
        "aux": aux.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "history": history,
        "elapsed": elapsed,
        "config": asdict(cfg),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def export(ckpt_dir: Path, dest: Path) -> None:
    """Write the trained model as a hub-style folder: config, weights, tokenizer, image processor, train log."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    state = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)
    tokenizer, image_processor = build_tokenizer(), build_image_processor()
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer))
    model.load_state_dict(state["model"])
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_CHARS + 2,
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    image_processor.save_pretrained(dest)
    log = {
        "config": state["config"],
        "steps": state["step"],
        "train_minutes": round(state["elapsed"] / 60, 1),
        "history": state["history"],
        "heldout_greedy": heldout_greedy(dest, HELDOUT_REPORT_IMAGES),
    }
    atomic_write_json(dest / "train_log.json", log)


HELDOUT_REPORT_IMAGES = 500


def heldout_greedy(model_dir: Path, num: int) -> dict:
    """Greedy ``generate`` accuracy of the exported model on the first ``num`` held-out images (the figure the
    tests and README quote)."""
    from sparsemm.app.evaluation import evaluate
    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples

    result = evaluate(load_model(str(model_dir)), heldout_samples(num), None)
    return {
        "images": num,
        "seeds": [0, num],
        "exact": result.exact,
        "exact_ci": result.exact_ci,
        "char_acc": result.char_acc,
        "char_ci": result.char_ci,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log); resumed if present")
    parser.add_argument("--export", type=Path, help="export the run's checkpoint to this model folder and exit")
    parser.add_argument("--max-minutes", type=float, help="stop (and checkpoint) after this many minutes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    for name, field in TrainConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.export:
        export(args.out, args.export)
        return
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    print(json.dumps(train(args.out, cfg, args.max_minutes)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
