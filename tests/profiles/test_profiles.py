"""HeadProfile files and the official-format importer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsemm.errors import OutputExistsError, ProfileError
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.official import import_official_profile, parse_official_scores
from sparsemm.profiles.signature import ModelSignature

SIG = ModelSignature("llama", 2, 4, 2, 16)


def _profile(scores=None, sig=SIG) -> HeadProfile:
    scores = scores if scores is not None else [[0.1, 0.2, 0.0, 0.4], [0.3, 0.0, 0.5, 0.1]]
    return HeadProfile(scores=tuple(map(tuple, scores)), signature=sig, window=8, kernel=3, provenance={"x": 1})


def test_roundtrip_and_sha(tmp_path):
    p = _profile()
    path = p.save(tmp_path / "p.json")
    q = HeadProfile.load(path)
    assert q == p and q.sha256() == p.sha256()
    assert np.allclose(q.normalized().sum(), 1.0)
    # GQA: the KV score is the sum of its group's normalised query-head scores
    assert np.allclose(q.kv_scores(), [[0.3 / 1.6, 0.4 / 1.6], [0.3 / 1.6, 0.6 / 1.6]])


def test_save_refuses_overwrite(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        _profile().save(path)
    assert path.read_text() == "keep me"
    _profile().save(path, force=True)
    assert HeadProfile.load(path) == _profile()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["scores"][0].__setitem__(1, -0.5), "negative"),
        (lambda d: d["scores"][1].pop(), "3 head scores"),
        (lambda d: d["scores"].pop(), "scores for 1 layers"),
        (lambda d: d.__setitem__("schema_version", 99), "schema version 99"),
        (lambda d: d.pop("signature"), 'missing "signature"'),
        (lambda d: d["scores"][0].__setitem__(0, "x"), "not a finite number"),
        (lambda d: d.__setitem__("scores", [[0, 0, 0, 0], [0, 0, 0, 0]]), "zero"),
    ],
)
def test_malformed_profiles_are_clear_errors(tmp_path, mutate, message):
    data = _profile().to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        HeadProfile.load(path)


def test_nan_and_broken_json(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(_profile().to_json().replace("0.4", "NaN"))
    with pytest.raises(ProfileError, match="NaN"):
        HeadProfile.load(path)
    path.write_text("{ not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        HeadProfile.load(path)
    with pytest.raises(ProfileError, match="does not exist"):
        HeadProfile.load(tmp_path / "missing.json")


def test_check_model_refuses_other_shapes_naming_both():
    config = {
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "hidden_size": 64,
    }
    with pytest.raises(ProfileError) as info:
        _profile().check_model(config)
    assert "2 layers × 4 heads (2 KV heads" in str(info.value) and "(1 KV heads" in str(info.value)
    ok = dict(config, num_key_value_heads=2)
    _profile().check_model(ok)  # same shapes: accepted


def test_signature_from_vlm_config_reads_text_config():
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        text_config={
            "model_type": "llama",
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "hidden_size": 128,
        }
    )
    sig = ModelSignature.from_config(cfg)
    assert (sig.model_type, sig.num_layers, sig.num_heads, sig.num_kv_heads, sig.head_dim) == ("llava", 3, 8, 2, 16)
    assert sig.config_hash and sig.config_hash == ModelSignature.from_config(cfg.to_dict()).config_hash


def test_official_keys_parsed_not_trusted_by_order():
    data = {"1-1": [4.0], "0-0": [1.0, 3.0], "1-0": 3, "0-1": [0.5]}
    assert parse_official_scores(data, 2, 2) == [[2.0, 0.5], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"0-0": [1], "0-1": [1], "1-0": [1]}, "1 of 4 heads have no score"),
        ({"0-0": [1], "0-1": [1], "1-0": [1], "1-1": [-1]}, "negative"),
        ({"0-0": [1], "0-1": [1], "1-0": [1], "1-1": []}, "empty"),
        ({"0-0": [1], "0-1": [1], "1-0": [1], "1-1": [1], "2-0": [1]}, "outside a model"),
        ({"0_0": [1]}, "not of the form"),
        ([1, 2], "expected a JSON object"),
        ({"0-0": [1], "00-0": [1], "0-1": [1], "1-0": [1], "1-1": [1]}, "appears twice"),
    ],
)
def test_official_format_errors(data, message):
    with pytest.raises(ProfileError, match=message):
        parse_official_scores(data, 2, 2)


def test_import_official_file(official_format_path):
    sig = ModelSignature("llava_next", 32, 32, 32, 128)
    profile = import_official_profile(official_format_path, sig)
    raw = json.loads(official_format_path.read_text())
    assert profile.array()[14, 24] == pytest.approx(np.mean(raw["14-24"]))
    assert profile.provenance["values_per_head"] == [2]
