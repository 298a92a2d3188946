"""The check every short-name test shares: a short name resolves through the local Hugging Face cache only."""

from __future__ import annotations

import json


def check_resolves_from_the_local_cache_only(name: str, hub_id: str, model_type: str, tmp_path, monkeypatch):
    """``name`` → ``hub_id``: with the cache empty, resolving fails naming the hub id (nothing is downloaded); with a
    fake snapshot of ``hub_id`` in the cache, it resolves to that snapshot. Returns the snapshot folder."""
    import huggingface_hub.constants as hub_constants
    import pytest

    from sparsemm.errors import ModelResolutionError
    from sparsemm.resolve import KNOWN_MODELS, resolve_model

    assert KNOWN_MODELS[name] == hub_id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelResolutionError, match=hub_id.replace(".", r"\.")):
        resolve_model(name)
    repo = tmp_path / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert resolve_model(name) == snapshot
    return snapshot
