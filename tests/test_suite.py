"""The suite itself: with only the ``test`` extra installed (no SGLang, no ONNX, no HTTP clients), every module is
collected, and the ones that need what is missing skip, saying what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MISSING = ("sglang", "requests", "aiohttp", "onnx", "onnxruntime", "onnxscript", "onnxruntime_extensions")


def test_the_suite_collects_without_the_optional_extras(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(  # as if never installed: every finder's answer for them is None
        "import sys\n"
        f"MISSING = {MISSING!r}\n"
        "class Hide:\n"
        "    def __init__(self, inner):\n"
        "        self.inner = inner\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in MISSING:\n"
        "            return None\n"
        "        return self.inner.find_spec(name, path, target)\n"
        "    def __getattr__(self, attr):\n"
        "        return getattr(self.inner, attr)\n"
        "sys.meta_path[:] = [Hide(f) if hasattr(f, 'find_spec') else f for f in sys.meta_path]\n"
    )
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=", str(TESTS)]  # fmt: skip
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=TESTS.parent)
    text = out.stdout + out.stderr
    errors = [
        line for line in text.splitlines() if line.startswith("ERROR") or ("collected" in line and "error" in line)
    ]
    assert out.returncode == 0 and not errors, text[-3000:]
    for module in ("test_sglang_sparsemm.py", "test_onnx_engine.py", "test_onnx_attention.py"):
        assert module in text and "SKIPPED" in text, text[-3000:]
    assert "pip install -e '.[onnx]'" in text and "requests" in text
