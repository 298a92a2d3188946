"""What a client may send a ``--kv-policy sparsemm`` server, and which media a ``sparsemm serve`` server loads:
the plain functions behind the HTTP checks, without a server (the live checks are in ``test_sglang_sparsemm.py``)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsemm.resolve import resolve_spec
from sparsemm.serving.sglang.config import parse_serving_flags
from sparsemm.serving.sglang.media import MediaPolicy, check_request_media, media_items
from sparsemm.serving.sglang.request_fields import (
    REQUEST_KEYS,
    check_custom_params,
    generate_body_error,
    share_len_of,
)

TINY = str(resolve_spec("tiny").path)
CONFIG, _ = parse_serving_flags(
    ["--model-path", TINY, "--kv-policy", "sparsemm", "--sparsemm-budget", "24", "--sparsemm-max-budget", "64"]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


def test_custom_params_accept_the_budget_and_foreign_keys():
    assert check_custom_params(None, CONFIG) is None
    assert check_custom_params({}, CONFIG) is None
    assert check_custom_params({"sparsemm_budget": 40, "my_logit_processor_arg": [1, 2]}, CONFIG) == 40
    assert check_custom_params({"sparsemm_budget": None}, CONFIG) is None


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ("abc", "custom_params must be a JSON object"),
        (["x"], "got list"),
        (5, "got int 5"),
        (True, "got bool"),
        ("sparsemm_budget=5", "must be a JSON object"),
        ({"sparsemm_budjet": 30}, "unknown key 'sparsemm_budjet'; this server accepts sparsemm_budget"),
        ({"sparsemm_budget": "48"}, "from 9 to 64"),
        ({"sparsemm_budget": 8}, "from 9 to 64"),
        ({"sparsemm_budget": 10**30}, "from 9 to 64"),
        ({"sparsemm_budget": 24.0}, "got 24.0"),
        ({"sparsemm_budget": False}, "got False"),
        ({"sparsemm_share_len": -1}, "sparsemm_share_len must be an integer from 0 to the prompt's length"),
        ({"sparsemm_share_len": "64"}, "got '64'"),
        ({"sparsemm_share_len": True}, "got True"),
        ({"sparsemm_share_len": 3.5}, "got 3.5"),
    ],
)
def test_bad_custom_params_are_value_errors_naming_the_field(params, fragment):
    with pytest.raises(ValueError, match=r"custom_params|sparsemm_budget|sparsemm_share_len") as info:
        check_custom_params(params, CONFIG)
    assert fragment in str(info.value)


POLICY_KEYED = st.dictionaries(st.sampled_from(["sparsemm_budget", "sparsemm_share_len", "sparsemm_x", "other"]), JSON)


@given(JSON | POLICY_KEYED)
def test_no_custom_params_raise_anything_but_a_value_error(params):
    """Any JSON value: accepted (then the budget is an in-range int or None) or a ValueError, nothing else."""
    try:
        budget = check_custom_params(params, CONFIG)
    except ValueError as exc:
        assert any(name in str(exc) for name in ("custom_params", "sparsemm_budget", "sparsemm_share_len"))
        return
    assert budget is None or (isinstance(budget, int) and 9 <= budget <= 64)
    share = share_len_of(params)
    assert share is None or (isinstance(share, int) and not isinstance(share, bool) and share >= 0)


def test_a_share_len_is_read_once_accepted():
    assert check_custom_params({"sparsemm_share_len": 0, "sparsemm_budget": 30}, CONFIG) == 30
    assert share_len_of({"sparsemm_share_len": 96}) == 96 and share_len_of(None) is None


@given(st.dictionaries(st.text(max_size=20), JSON, max_size=5) | JSON)
def test_generate_bodies_are_refused_only_for_the_policys_keys_at_the_top(body):
    error = generate_body_error(body)
    stray = isinstance(body, dict) and any(
        k == "custom_params" or (isinstance(k, str) and k.startswith("sparsemm_")) for k in body
    )
    assert (error is not None) == stray
    assert error is None or "sampling_params" in error


def test_top_level_policy_keys_name_where_they_belong():
    assert "belongs inside sampling_params" in generate_body_error({"text": "x", "custom_params": {}})
    error = generate_body_error({"text": "x", "sparsemm_budget": 30})
    assert "sparsemm_budget is not a /generate field" in error and '"custom_params"' in error
    assert generate_body_error({"text": "x", "sampling_params": {"custom_params": {"sparsemm_budget": 30}}}) is None
    assert set(REQUEST_KEYS) == {"sparsemm_budget", "sparsemm_share_len"}


# -- media ---------------------------------------------------------------------------------------------------------
B64_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="


@pytest.mark.parametrize(
    "item", [B64_PNG, "data:image/png;base64," + B64_PNG, b"\x89PNG", None, {"format": "processor_output"}]
)
def test_inline_media_always_pass(item):
    MediaPolicy().check(item)
    check_request_media(type("Req", (), {"image_data": [item, [item]]})(), MediaPolicy())


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("/etc/passwd", "does not read local files"),
        ("file:///etc/hosts", "does not read local files"),
        ("file://localhost/etc/hosts", "does not read local files"),
        ("~/.ssh/id_rsa", "does not read local files"),
        ("x.png", "does not read local files"),  # SGLang's media cache reads relative paths with an image suffix
        ("../../secret.jpg", "does not read local files"),
        ("/9j/4AAQSkZJRgABAQ", "data: URL for a JPEG"),  # raw base64 JPEG: SGLang would open() it
        ("http://127.0.0.1:9/x.png", "--allow-media-urls 127.0.0.1"),
        ("https://example.com/cat.png", "--allow-media-urls example.com"),
        ("ftp://example.com/cat.png", "unsupported media URL scheme"),
        ("s3://bucket/cat.png", "unsupported media URL scheme"),
    ],
)
def test_paths_and_urls_are_refused_by_default(item, fragment):
    with pytest.raises(ValueError, match="image_data") as info:
        MediaPolicy().check(item)
    assert fragment in str(info.value)


def test_video_and_audio_strings_are_paths_unless_inline(tmp_path):
    for field in ("video_data", "audio_data"):
        with pytest.raises(ValueError, match=f"{field}: this server does not read local files"):
            MediaPolicy().check("clip", field)  # SGLang's audio loader opens any other string as a path
        MediaPolicy().check("data:audio/wav;base64,AAAA", field)


def test_allowed_folders_and_domains(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    policy = MediaPolicy.allowing([str(pics)], "Example.com, cdn.example.org.")
    assert policy.url_domains == ("cdn.example.org", "example.com")
    policy.check(str(pics / "a.png"))
    policy.check(f"file://{pics / 'a.png'}")
    policy.check("https://EXAMPLE.com/a.png")
    for bad in (str(tmp_path / "secret.png"), str(pics / ".." / "secret.png"), f"{pics}-evil/a.png"):
        with pytest.raises(ValueError, match="outside"):
            policy.check(bad)
    link = pics / "link.png"
    link.symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="outside"):
        policy.check(str(link))  # resolved before the check
    with pytest.raises(ValueError, match="does not fetch media URLs"):
        policy.check("https://evil.example.com/a.png")  # exact host names only
    assert MediaPolicy.from_json(policy.to_json()) == policy


def test_every_nesting_of_a_request_is_checked():
    class ImageData:
        url = "file:///etc/hosts"

    nested = [[B64_PNG, {"url": "/etc/passwd"}], ImageData()]
    assert list(media_items(nested)) == [B64_PNG, "/etc/passwd", "file:///etc/hosts"]
    with pytest.raises(ValueError, match="local files"):
        check_request_media(type("Req", (), {"image_data": None, "audio_data": [nested]})(), MediaPolicy())


@given(st.text(max_size=40))
def test_a_refusal_never_depends_on_the_disk(text):
    """Two policies that differ only in what exists on disk answer alike: the decision reads the text alone."""
    try:
        MediaPolicy().check(text)
        verdict = "ok"
    except ValueError as exc:
        verdict = str(exc).split("(")[0]
    assert verdict in ("ok", "image_data: this server does not read local files ", "image_data: this server does "
                       "not fetch media URLs ", "image_data: unsupported media URL scheme ")  # fmt: skip
    if verdict == "ok":
        assert not text.startswith(("/", "~")) and "." not in text and "\\" not in text


# -- sparsemm serve ------------------------------------------------------------------------------------------------
def test_serve_passes_the_media_policy_and_warns_beyond_loopback(tmp_path):
    from click.testing import CliRunner

    from sparsemm.app.cli import cli
    from sparsemm.app.loadtest_cmd import is_loopback

    out = CliRunner().invoke(cli, ["serve", "--print", "--allow-local-media", str(tmp_path), "--allow-media-urls",
                                   "a.com"])  # fmt: skip
    assert out.exit_code == 0, out.output
    shown = out.output.split("SPARSEMM_MEDIA_POLICY=", 1)[1].split("' ", 1)[0].strip("'")
    assert json.loads(shown) == {"local_dirs": [str(tmp_path.resolve())], "url_domains": ["a.com"]}
    default = CliRunner().invoke(cli, ["serve", "--print", "--policy", "full"])
    assert '"local_dirs": [], "url_domains": []' in default.output  # safe by default, with either policy
    assert "warning" not in default.output
    exposed = CliRunner().invoke(cli, ["serve", "--print", "--", "--host", "0.0.0.0"])
    assert "warning: serving on 0.0.0.0 (beyond this machine) without --api-key" in exposed.output
    keyed = CliRunner().invoke(cli, ["serve", "--print", "--", "--host", "0.0.0.0", "--api-key", "k"])
    assert "warning" not in keyed.output
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com"))


def test_batch_shaped_sampling_params_must_match_the_prompts():
    """Shapes SGLang 0.5.23 answers with a 500 or a broken stream (found by the fuzzed soak): a 400 instead."""
    from sparsemm.serving.sglang.request_fields import body_shape_error

    assert "single one" in body_shape_error({"text": "x", "sampling_params": [{}]})
    assert "single one" in body_shape_error({"input_ids": [1, 2], "sampling_params": [{}]})
    assert "1 entries for a batch of 2" in body_shape_error({"text": ["a", "b"], "sampling_params": [{}]})
    assert "3 entries for a batch of 2" in body_shape_error({"input_ids": [[1], [2]], "sampling_params": [{}] * 3})
    assert body_shape_error({"text": ["a", "b"], "sampling_params": [{}, {}]}) is None
    assert body_shape_error({"text": ["a", "b"], "sampling_params": {}}) is None
    assert body_shape_error({"text": "a", "sampling_params": {}}) is None
