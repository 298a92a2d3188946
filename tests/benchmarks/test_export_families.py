"""``benchmarks.export_families`` in its quick mode on one tiny family: it runs end to end (an export in a child
process, the interleaved torch and onnxruntime decode steps) and writes the JSON the committed run is read from."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

from benchmarks import export_families


def test_quick_run_writes_the_per_family_record(tmp_path):
    export_families.main(["--quick", "--families", "qwen2_vl", "--results", str(tmp_path)])
    result = json.loads((tmp_path / "export_families.json").read_text())
    assert {"command", "machine", "date", "configs", "steps", "timing", "families"} <= set(result)
    assert result["command"].startswith("OMP_NUM_THREADS=1 python -m benchmarks.export_families --quick")
    assert result["quick"] is True and result["configs"] == ["standard:float32"]
    (row,) = result["families"]
    assert row["family"] == "qwen2_vl" and row["text_tower"] == "qwen2_vl_text"
    export = row["export"]["standard-float32"]
    assert export["seconds"] > 0 and export["folder_bytes"] > 1 << 20  # three graphs of a 1.2M-parameter model
    assert export["peak_rss_bytes"] > 100 << 20 and export["estimated_peak_bytes"] > 1 << 30  # the child, torch in
    assert set(row["decode_median_step_ms"]) == {"torch", "onnx-standard-float32"}
    assert row["decode_ratio_vs_torch"]["onnx-standard-float32"] > 0


def test_configs_the_runner_cannot_time_are_refused():
    with pytest.raises(SystemExit, match="custom:float16 does not run in onnxruntime"):
        export_families.parse_configs("custom:float16")
    with pytest.raises(SystemExit, match="not ATTENTION:DTYPE"):
        export_families.parse_configs("standard:bfloat16")
