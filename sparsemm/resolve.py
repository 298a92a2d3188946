"""Model names → local folders and their sparsemm defaults, in one place.

``resolve_spec(name_or_path)`` gives a ``ModelSpec``: the folder, the head profile it ships (if any) and its
defaults, read from a small ``sparsemm.json`` next to ``config.json``::

    {"schema": "sparsemm.model_defaults", "schema_version": 1, "window": 8, "kernel": 3, "page_size": 4,
     "max_new_tokens": 12, "profile": "profile.json", "default_budget": 48}

Every field is optional. ``tiny`` is the OCR model shipped inside the package (it ships such a file). Real model
names resolve to a local folder or to the local Hugging Face cache only: nothing is downloaded at run time, and
a miss says which hub id to fetch and that ``--model PATH`` takes a folder directly.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sparsemm.errors import ModelResolutionError
from sparsemm.fileio import read_json
from sparsemm.signature import ModelSignature

#: Short names users type → hub ids of the checkpoints SparseMM targets.
KNOWN_MODELS: dict[str, str] = {
    "llava": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-1.5": "llava-hf/llava-1.5-7b-hf",
    "llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-next-mistral": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct",
    "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "mistral3": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "mistral-small-3.1": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "internvl3": "OpenGVLab/InternVL3-8B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "gemma3": "google/gemma-3-4b-it",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "gemma-3-27b": "google/gemma-3-27b-it",
}
TINY = "tiny"
DEFAULTS_FILE = "sparsemm.json"
DEFAULTS_SCHEMA = "sparsemm.model_defaults"
DEFAULTS_SCHEMA_VERSION = 1
#: A head profile found next to the model when ``sparsemm.json`` names none.
PROFILE_FILE = "profile.json"


def tiny_model_dir() -> Path:
    """The shipped tiny OCR model's folder (package data of ``sparsemm.models``, found without importing it)."""
    spec = importlib.util.find_spec("sparsemm.models")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tiny_ocr"
    if not (folder / "config.json").exists():
        raise ModelResolutionError(
            f"the shipped tiny model is missing from {folder}; reinstall sparsemm "
            "(pip install --force-reinstall sparsemm) or train it: python -m sparsemm.app.train --help"
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


@dataclass(frozen=True)
class ModelDefaults:
    """What a model folder's ``sparsemm.json`` recommends (``None``: not said, a later source decides)."""

    window: int | None = None
    kernel: int | None = None
    page_size: int | None = None
    max_new_tokens: int | None = None
    default_budget: int | None = None
    profile: str | None = None
    image_size: tuple[int, int] | None = None  # [width, height] an engine folder reads (sparsemm-export)

    @classmethod
    def load(cls, path: Path) -> ModelDefaults:
        data = read_json(path, what="model defaults", error=ModelResolutionError, reject_nan=True)
        if not isinstance(data, dict) or data.get("schema") != DEFAULTS_SCHEMA:
            raise ModelResolutionError(
                f'{path} is not a sparsemm model-defaults file (no "schema": "{DEFAULTS_SCHEMA}")'
            )
        if data.get("schema_version") != DEFAULTS_SCHEMA_VERSION:
            raise ModelResolutionError(
                f"{path} has schema version {data.get('schema_version')!r}; "
                f"this sparsemm reads {DEFAULTS_SCHEMA_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"schema", "schema_version"}
        if unknown:
            raise ModelResolutionError(
                f"{path} has unknown keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        size = data.get("image_size")
        if size is not None and not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)
        ):
            raise ModelResolutionError(f"{path}: image_size must be [width, height] in pixels, got {size!r}")
        for key in known - {"profile", "image_size"}:
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ModelResolutionError(f"{path}: {key} must be a positive integer, got {value!r}")
        if data.get("profile") is not None and not isinstance(data["profile"], str):
            raise ModelResolutionError(f"{path}: profile must be a file name relative to the model folder")
        return cls(**{k: data.get(k) for k in known - {"image_size"}}, image_size=tuple(size) if size else None)

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": DEFAULTS_SCHEMA, "schema_version": DEFAULTS_SCHEMA_VERSION}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})
        if self.image_size is not None:
            out["image_size"] = list(self.image_size)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: its folder, what the user called it, its defaults and the profile it ships."""

    name: str
    path: Path
    defaults: ModelDefaults

    @property
    def label(self) -> str:
        """The short name for known models (``tiny``, ``qwen2-vl``), else the folder."""
        return self.name if (self.name == TINY or self.name.lower() in KNOWN_MODELS) else str(self.path)

    @property
    def profile_path(self) -> Path | None:
        """The head profile shipped with the model: ``sparsemm.json``'s ``profile``, else ``profile.json``."""
        if self.defaults.profile is not None:
            path = self.path / self.defaults.profile
            if not path.exists():
                raise ModelResolutionError(
                    f"{self.path / DEFAULTS_FILE} names the profile {self.defaults.profile}, "
                    f"which is not in {self.path}"
                )
            return path
        path = self.path / PROFILE_FILE
        return path if path.exists() else None

    def config(self) -> dict[str, Any]:
        data = read_json(self.path / "config.json", what="model config", error=ModelResolutionError)
        if not isinstance(data, dict):
            raise ModelResolutionError(f"{self.path / 'config.json'} is not a JSON object")
        return data

    def signature(self) -> ModelSignature:
        return ModelSignature.from_config(self.config())


def resolve_spec(name_or_path: str | os.PathLike) -> ModelSpec:
    """``resolve_model`` plus the folder's ``sparsemm.json`` defaults (all unset when the file is absent)."""
    path = resolve_model(name_or_path)
    file = path / DEFAULTS_FILE
    defaults = ModelDefaults.load(file) if file.exists() else ModelDefaults()
    return ModelSpec(str(name_or_path), path, defaults)
