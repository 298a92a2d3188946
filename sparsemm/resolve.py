"""Model names → local folders, in one place.

``tiny`` is the OCR model shipped inside the package. Real model names resolve to a local folder or to the
local Hugging Face cache only: nothing is downloaded at run time, and a miss says which hub id to fetch and
that ``--model PATH`` takes a folder directly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sparsemm.errors import ModelResolutionError

#: Short names users type → hub ids of the checkpoints SparseMM targets.
KNOWN_MODELS: dict[str, str] = {
    "llava": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-1.5": "llava-hf/llava-1.5-7b-hf",
    "llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-next-mistral": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
TINY = "tiny"


def tiny_model_dir() -> Path:
    """The shipped tiny OCR model's folder (package data of ``sparsemm.models``, found without importing it)."""
    spec = importlib.util.find_spec("sparsemm.models")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tiny_ocr"
    if not (folder / "config.json").exists():
        raise ModelResolutionError(
            f"the shipped tiny model is missing from {folder}; reinstall sparsemm "
            "(pip install --force-reinstall sparsemm) or train it: python -m sparsemm.models.train --help"
        )
    return folder


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder holding ``config.json`` for ``tiny``, a known short name, a hub id or a path."""
    text = str(name_or_path)
    if text == TINY:
        return tiny_model_dir()
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelResolutionError(f"{path} has no config.json; --model PATH needs a transformers model folder")
        return path
    hub_id = KNOWN_MODELS.get(text.lower(), text if "/" in text else None)
    if hub_id is None:
        raise ModelResolutionError(
            f"unknown model {text!r}: use tiny, one of {', '.join(KNOWN_MODELS)}, a hub id, or --model PATH"
        )
    cached = _from_hf_cache(hub_id)
    if cached is None:
        raise ModelResolutionError(
            f"{text!r} ({hub_id}) is not in the local Hugging Face cache and sparsemm never downloads at run time; "
            f"run `huggingface-cli download {hub_id}` where you have network, or pass --model PATH"
        )
    return cached


def _from_hf_cache(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception:
        return None
    path = Path(folder)
    return path if (path / "config.json").exists() else None
