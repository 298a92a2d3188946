"""Evaluation metrics and report files."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from sparsemm.app.evaluation import EvalResult, char_accuracy, edit_distance, mean_interval, wilson
from sparsemm.app.report import check_report_target, plot_accuracy, write_report
from sparsemm.errors import OutputExistsError


def test_edit_distance_and_char_accuracy():
    assert edit_distance("KITTEN", "SITTING") == 3
    assert edit_distance("", "ABC") == 3 and edit_distance("ABC", "ABC") == 0
    assert char_accuracy("ABCD", "ABCD") == 1.0
    assert char_accuracy("ABD", "ABCD") == 0.75  # one dropped glyph costs one character, not the tail
    assert char_accuracy("", "ABCD") == 0.0 and char_accuracy("ZZZZZZZZZ", "AB") == 0.0


def test_wilson_interval_contains_the_estimate_and_is_sane():
    lo, hi = wilson(40, 100)
    assert lo < 0.4 < hi and lo > 0.30 and hi < 0.50
    exact = binomtest(40, 100).proportion_ci(method="wilson")
    assert lo == pytest.approx(exact.low, abs=1e-9) and hi == pytest.approx(exact.high, abs=1e-9)
    assert wilson(0, 50)[0] == pytest.approx(0.0, abs=1e-12) and wilson(50, 50)[1] == pytest.approx(1.0)
    assert mean_interval([0.0, 0.0, 1.0])[0] == 0.0


def _result(method, budget, exact, seed=None):
    return EvalResult(method, budget, seed, 10, exact, wilson(int(10 * exact), 10), exact, (0, 1), 1000.0, 50.0, 1.0)


def test_reports_replace_only_their_own_files(tmp_path):
    path = tmp_path / "r.json"
    results = [
        _result("full", None, 0.9),
        _result("sparsemm", 16, 0.8),
        _result("random", 16, 0.2, 0),
        _result("random", 16, 0.4, 1),
    ]
    write_report(check_report_target(path, False), results, {"x": 1}, "sparsemm eval")
    data = json.loads(path.read_text())
    assert data["generator"] == "sparsemm" and data["random_mean"][0]["exact"] == pytest.approx(0.3)
    check_report_target(path, False)  # our own report: may be replaced
    other = tmp_path / "mine.json"
    other.write_text('{"precious": true}')
    with pytest.raises(OutputExistsError):
        check_report_target(other, False)
    plot_accuracy(tmp_path / "r.png", results, "t")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
