"""``--kv-policy sparsemm`` without serving a model: flags, the plan path, the KV split, budgets, start-up refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from sparsemm.errors import SparseMMError
from sparsemm.plugin.recipe import plan_recipe
from sparsemm.resolve import resolve_spec
from sparsemm.serving.sglang import CONFIG_ENV, policy_requested
from sparsemm.serving.sglang.config import ServingConfig, parse_serving_flags

TINY = str(resolve_spec("tiny").path)
requires_sglang = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed")


def parse(*flags: str):
    return parse_serving_flags(["--model-path", TINY, "--kv-policy", "sparsemm", *flags, "--port", "1"])


def test_the_entry_point_is_inert_without_the_policy():
    assert not policy_requested(["python", "-m", "sglang.launch_server", "--model-path", "m"], {})
    assert policy_requested(["x", "--kv-policy", "sparsemm"], {})
    assert policy_requested(["x", "--kv-policy=sparsemm"], {})
    assert policy_requested(["scheduler"], {CONFIG_ENV: "{}"})


def test_flags_resolve_through_the_plan_path_like_the_cli():
    config, rest = parse("--sparsemm-budget", "24")
    assert rest == ["--model-path", TINY, "--port", "1"]
    assert config.default_plan == plan_recipe(resolve_spec("tiny"), budget=24).build()
    assert (config.obs_window, config.page_size) == (8, 4)  # the model folder's sparsemm.json
    defaults, _ = parse()
    assert defaults.default_plan.budget == 48  # the folder's default budget and profile
    again = ServingConfig.from_json(config.to_json())  # what the scheduler process rebuilds
    assert again.default_plan == config.default_plan


def test_per_request_budgets_are_validated_never_clipped():
    config, _ = parse("--sparsemm-budget", "24", "--sparsemm-max-budget", "64")
    assert config.check_budget(None) is None and config.check_budget(40) == 40
    for bad in (8, 65, "32", 32.0, True):
        with pytest.raises(ValueError, match="from 9 to 64"):
            config.check_budget(bad)
    assert config.plan_for_budget(40).budget == 40 and config.plan_for_budget(None).budget == 24


def test_a_plan_file_fixes_the_caps(tmp_path):
    path = plan_recipe(resolve_spec("tiny"), method="snapkv", budget=20).build().save(tmp_path / "p.json")
    config, _ = parse("--sparsemm-plan", str(path))
    assert config.default_plan.method == "snapkv"
    with pytest.raises(ValueError, match="fixed budget plan"):
        config.check_budget(30)
    with pytest.raises(SparseMMError, match="drop --sparsemm-profile"):
        parse("--sparsemm-plan", str(path), "--sparsemm-budget", "30")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--sparsemm-budget", "8"), "budget 8 must be an integer larger than the window 8"),
        (("--sparsemm-method", "adakv", "--sparsemm-budget", "24"), "refused for serving"),
        (("--sparsemm-method", "snapkv", "--sparsemm-ratio", "0.5"), "takes no ratio"),
        (("--sparsemm-head-pool-fraction", "1.5"), "must be in (0, 1)"),
        (("--sparsemm-max-budget", "20"), "below the server's budget 48"),
    ],
)
def test_bad_flags_name_the_fix(flags, fragment):
    with pytest.raises(SparseMMError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse(*flags)


def test_a_profile_for_another_model_names_both_shapes(tmp_path):
    from sparsemm.profiles.headprofile import HeadProfile
    from sparsemm.signature import ModelSignature

    sig = ModelSignature("llama", 2, 4, 2, 16)
    other = HeadProfile(tuple(tuple([1.0] * 4) for _ in range(2)), sig).save(tmp_path / "o.json")
    with pytest.raises(SparseMMError, match=r"llama: 2 layers.*qwen2_vl: 4 layers"):
        parse("--sparsemm-profile", str(other))


def test_the_split_keeps_max_total_tokens_meaning_kv_bytes():
    config, _ = parse("--sparsemm-budget", "48", "--sparsemm-head-pool-fraction", "0.25")
    kept, pages = config.split(8192, 1)
    assert kept == 6144
    sig = config.default_plan.signature
    # the head pool gets exactly the bytes of the slots taken from the token pool: L·Hkv·Pp-token pages
    assert pages * config.page_size == (8192 - kept) * sig.num_layers * sig.num_kv_heads
    caps = config.default_plan.caps_array()
    assert config.max_request_pages() == int(np.ceil(caps / config.page_size).sum())
    assert 0 < config.head_fraction() < 1


def test_a_head_pool_too_small_for_one_request_is_refused():
    config, _ = parse("--sparsemm-head-pool-fraction", "0.001")
    with pytest.raises(SparseMMError, match="raise --sparsemm-head-pool-fraction"):
        config.check_split(2048, 1)


def test_tensor_parallel_ranks_hold_their_heads_slice_and_admit_in_common_units():
    """Rank r holds KV heads [r·n, (r + 1)·n): its plan is that slice of the caps; admission counts the largest
    rank's pages (so every rank admits the same requests, and none past its pool); each rank's pool holds its
    heads' share of the token slots' bytes."""
    from dataclasses import replace

    from sparsemm.plugin.pages import pages_for

    one, _ = parse("--sparsemm-budget", "40", "--sparsemm-head-pool-fraction", "0.5")
    two = replace(one, tp_size=2)
    two.check_tp()
    plan = one.default_plan
    caps, n = plan.caps_array(), plan.signature.num_kv_heads // 2
    for rank in range(2):
        sliced = two.rank_plan(plan, rank)
        assert np.array_equal(sliced.caps_array(), caps[:, rank * n : (rank + 1) * n])
        assert (sliced.signature.num_kv_heads, sliced.signature.num_heads) == (n, plan.signature.num_heads // 2)
        assert np.array_equal(sliced.kept(300), plan.kept(300)[:, rank * n : (rank + 1) * n])
    for prompt in (10, 33, 300, 2000):
        per_rank = [pages_for(two.rank_plan(plan, r), prompt, 0, two.page_size, window_in_pool=False) for r in (0, 1)]
        whole = pages_for(plan, prompt, 0, one.page_size, window_in_pool=False)
        assert two.request_pages(plan, prompt) == max(per_rank) and sum(per_rank) == whole
        assert one.request_pages(plan, prompt) == whole
    assert one.split(4096, 1)[1] == 2 * two.split(4096, 1)[1]  # half the heads: half the pages per slot
    assert two.max_request_pages() <= one.max_request_pages()
    with pytest.raises(SparseMMError, match="does not divide the model's 4 KV heads"):
        replace(one, tp_size=3).check_tp()


@requires_sglang
def test_launcher_hook_adds_the_backends_and_refuses_conflicts(capsys, monkeypatch):
    from sparsemm.serving.sglang import plugin

    monkeypatch.setenv(CONFIG_ENV, "")  # recorded, so the configuration the hook writes is undone after the test
    monkeypatch.delenv(CONFIG_ENV)
    plugin.register_backends()  # what install() does in a launcher before it parses arguments
    calls = []

    def original(argv, *args, **kwargs):
        calls.append(list(argv))
        from sglang.srt.server_args import prepare_server_args

        return prepare_server_args(argv)

    base = ["--model-path", TINY, "--device", "cpu", "--kv-policy", "sparsemm", "--sparsemm-budget", "24"]
    args = plugin.around_prepare_server_args(original, base)
    assert args.attention_backend == "sparsemm" and args.radix_cache_backend == "sparsemm"
    assert not args.disable_radix_cache and "--kv-policy" not in calls[-1]  # prefix sharing: the default
    assert json.loads(__import__("os").environ[CONFIG_ENV])["knobs"]["budget"] == 24
    assert plugin.around_prepare_server_args(original, base + ["--sparsemm-no-prefix-sharing"]).disable_radix_cache
    assert json.loads(__import__("os").environ[CONFIG_ENV])["tp_size"] == 1
    assert plugin.around_prepare_server_args(original, base + ["--tp-size", "2"]).tp_size == 2
    assert json.loads(__import__("os").environ[CONFIG_ENV])["tp_size"] == 2  # what every rank reads
    capsys.readouterr()  # the accepted starts' log lines
    for extra, fragment in (
        (["--disable-radix-cache"], "drop --disable-radix-cache"),
        (["--attention-backend", "torch_native"], "drop --attention-backend torch_native"),
        (["--tp-size", "3"], "--tp-size 3 does not divide the model's 4 KV heads"),
        (["--tp-size", "8"], "--tp-size 8 does not divide the model's 4 KV heads"),
        (["--speculative-algorithm", "NGRAM"], "drop --speculative-algorithm"),
        (["--enable-dp-attention"], "drop --enable-dp-attention"),
        (["--max-total-tokens", "256", "--sparsemm-head-pool-fraction", "0.01"], "head pool gets"),
    ):
        with pytest.raises(SystemExit) as info:
            plugin.around_prepare_server_args(original, base + extra)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert info.value.code == 2 and len(err) == 1 and fragment in err[0], (extra, err)


@requires_sglang
def test_every_hook_target_is_checked():
    from sparsemm.serving.sglang import plugin

    hooks = plugin._policy_hooks() + plugin._request_hooks(True)
    plugin.check_targets([(h.target, h.params) for h in hooks] + list(plugin.USED))  # 0.5.23: all fine
    for target, params, fragment in (
        ("sglang.srt.mem_cache.common.no_such_function", ("req",), "is gone"),
        ("sglang.srt.mem_cache.common.release_kv_cache", ("req", "cache"), "now takes"),
    ):
        with pytest.raises(plugin.InstallError, match=fragment):
            plugin.check_targets([(target, params)])


@requires_sglang
def test_another_sglang_version_is_refused(monkeypatch):
    from sparsemm.serving.sglang import plugin

    monkeypatch.setattr(plugin.importlib.metadata, "version", lambda name: "0.5.24")
    with pytest.raises(plugin.InstallError, match=r"sglang==0\.5\.23"):
        plugin.check_version()


@requires_sglang
def test_a_failed_install_stops_the_process_naming_it(capsys, monkeypatch):
    """Whatever goes wrong while installing (here a hook target from another SGLang) ends the process with one
    line naming it, never a server running with half the policy."""
    from sparsemm.serving.sglang import plugin

    monkeypatch.setattr(plugin, "PINNED_SGLANG", "0.0.1")
    with pytest.raises(SystemExit) as info:
        plugin.install(policy=True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(err) == 1
    assert "did not install in SGLang's HTTP server (launcher) process" in err[0] and "0.0.1" in err[0]


@requires_sglang
@pytest.mark.parametrize(("entry", "name"), [("run_detokenizer_process", "detokenizer"), ("main", "HTTP server")])
def test_the_install_failure_names_the_process_it_happened_in(capsys, monkeypatch, entry, name):
    """The process is told apart by the SGLang function that loads the plugins in it; the install made to fail there
    (a test-only switch) ends that process with one line naming it."""
    from sparsemm.serving.sglang import plugin

    role = "detokenizer" if entry == "run_detokenizer_process" else "http"
    monkeypatch.setenv(plugin.BREAK_INSTALL_ENV, role)
    scope: dict = {"install": plugin.install}
    exec(f"def {entry}():\n    install(policy=True)\n", scope)  # a function of SGLang's name calls the plugin
    with pytest.raises(SystemExit) as info:
        scope[entry]()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(err) == 1 and f"did not install in SGLang's {name}" in err[0]


@requires_sglang
@pytest.mark.sglang
@pytest.mark.slow
def test_a_process_where_the_policy_did_not_install_stops_the_server(tmp_path):
    """End to end, for the scheduler: the install made to fail there stops the whole server before it serves, with
    one line naming the process (no fourth server start: the scheduler stops before a model loads)."""
    from benchmarks.serve import free_port, server_env
    from sparsemm.serving.sglang.plugin import BREAK_INSTALL_ENV

    cmd = [sys.executable, "-m", "sparsemm.app.cli", "serve", "--model", TINY, "--", "--port", str(free_port()),
           "--skip-server-warmup"]  # fmt: skip
    env = server_env({BREAK_INSTALL_ENV: "scheduler"})
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1, (out.returncode, out.stderr[-2000:])
    assert "did not install in SGLang's scheduler process" in errors[0] and BREAK_INSTALL_ENV in errors[0]
