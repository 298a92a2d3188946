"""The README's Targets table is the rendering of ``export/targets.json`` and the committed results (issue 32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsemm.export import targets

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_rendering_of_the_data_file_and_results():
    readme = (ROOT / "README.md").read_text()
    assert targets.readme_block(readme) == targets.render(targets.load_rows(), ROOT), (
        "README's Targets table is stale: run `python -m sparsemm.export.targets --write`"
    )


def test_every_row_names_existing_tests_and_evidence_files_by_section():
    rows = targets.load_rows()
    assert len({r["artifact"] for r in rows}) == len(rows)
    for row in rows:
        assert row["tests"], row["artifact"]
        for test in row["tests"]:
            assert (ROOT / test).is_file(), f"{row['artifact']}: {test} does not exist"
        for item in row["gpu_evidence"]:
            assert set(item) == {"result", "section"} and item["result"].startswith("benchmarks/results/")


def test_gpu_column_comes_only_from_a_result_that_ran_the_section_on_a_gpu(tmp_path):
    evidence = [{"result": "benchmarks/results/gpu_decode.json", "section": "correctness"}]
    assert targets.gpu_verification(evidence, tmp_path) == "never"  # no committed result
    result = tmp_path / "benchmarks" / "results" / "gpu_decode.json"
    result.parent.mkdir(parents=True)
    payload = {"date": "2026-12-07 12:00 UTC", "environment": {"device": "cpu"}, "correctness": {"ok": True}}
    result.write_text(json.dumps(payload))
    assert targets.gpu_verification(evidence, tmp_path) == "never"  # a CPU dry run is not GPU evidence
    payload["environment"]["gpu"] = "NVIDIA H100 80GB HBM3"
    payload["errors"] = {"correctness": "launch failed"}
    result.write_text(json.dumps(payload))
    assert targets.gpu_verification(evidence, tmp_path) == "never"  # the section failed
    payload["errors"], payload["correctness"] = {}, {"cases": [], "failures": 1}
    result.write_text(json.dumps(payload))
    assert targets.gpu_verification(evidence, tmp_path) == "never"  # it ran, and a case failed
    payload["correctness"]["failures"] = 0
    result.write_text(json.dumps(payload))
    assert targets.gpu_verification(evidence, tmp_path).startswith("2026-12-07 12:00 UTC, NVIDIA H100 80GB HBM3")


def test_write_replaces_only_the_block_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{targets.BEGIN}\nold table\n{targets.END}\noutro\n")
    assert targets.write_readme(readme, "| new |") is True
    assert readme.read_text() == f"intro\n{targets.BEGIN}\n| new |\n{targets.END}\noutro\n"
    assert targets.write_readme(readme, "| new |") is False
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no Targets block"):
        targets.write_readme(readme, "| new |")
    assert readme.read_text() == "no markers here\n"  # untouched
