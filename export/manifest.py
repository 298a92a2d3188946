"""``manifest.json`` of an engine folder: what each file is, and the check that none changed since export.

The manifest lists every other file of the folder with its sha256 and carries ``manifest_sha256``, the sha256 of its
own canonical JSON without that field. ``verify_folder`` refuses a folder whose manifest, plan, graphs, external
data or tokenizer files differ from what was exported (an integrity check against edits and partial copies, not a
signature). Torch-free: the runner imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sparsemm.errors import SparseMMError

MANIFEST = "manifest.json"
SCHEMA = "sparsemm.onnx_engine"
SCHEMA_VERSION = 1
GRAPHS = ("vision", "prefill", "decode")
#: How a decode graph computes attention: one custom node per layer, or plain ONNX operators.
ATTENTION_VARIANTS = ("custom", "standard")
#: Graphs whose weights exceed this many bytes keep them in ``<graph>.onnx.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2**31 - 1


class EngineFolderError(SparseMMError):
    """An engine folder that is missing, incomplete, from another sparsemm, or changed after export."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no ``manifest_sha256``)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Add every other file's sha256 and size, then the manifest's own hash."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    sealed = {**manifest, "files": files}
    sealed["manifest_sha256"] = canonical_sha256(sealed)
    return sealed


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``, schema checked (no file hashes checked: see ``verify_folder``)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EngineFolderError(f"engine folder {folder} does not exist; create one with sparsemm-export --out DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineFolderError(f"{folder} has no {MANIFEST}: not an engine folder (sparsemm-export --out)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineFolderError(f"{path} is not valid JSON ({exc}); re-export it with sparsemm-export") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise EngineFolderError(f'{path} is not a sparsemm engine manifest (no "schema": "{SCHEMA}")')
    if data.get("schema_version") != SCHEMA_VERSION:
        raise EngineFolderError(
            f"{path} has engine schema version {data.get('schema_version')!r}; this sparsemm reads version "
            f"{SCHEMA_VERSION}: re-export the engine with this sparsemm-export"
        )
    return data


def verify_folder(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that it and every file it lists are exactly as exported."""
    manifest = read_manifest(folder)
    fix = "re-export it with sparsemm-export --force"
    if manifest.get("manifest_sha256") != canonical_sha256(manifest):
        raise EngineFolderError(f"{folder / MANIFEST} was changed after export; {fix}")
    for rel, info in sorted(manifest.get("files", {}).items()):
        path = folder / rel
        if not path.is_file():
            raise EngineFolderError(f"{path} is missing from the engine folder; {fix}")
        if path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
            raise EngineFolderError(f"{path} changed after export (sha256 differs from the manifest); {fix}")
    for name in GRAPHS:
        if manifest.get("graphs", {}).get(name, {}).get("file") not in manifest.get("files", {}):
            raise EngineFolderError(f"the manifest lists no {name} graph file; {fix}")
    return manifest
