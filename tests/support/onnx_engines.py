"""Engine folders for the ONNX tests, each exported once per test session and shared by the xdist workers, and a
way to run code in a subprocess where ``import torch`` fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from sparsemm.export.build import export_model

#: name -> how it is exported. ``cli``: through the ``sparsemm-export`` console script with the model's defaults.
ENGINES = {
    "custom-b48-cli": {"cli": True},
    "custom-b12": {"budget": 12, "attention": "custom"},
    "standard-b24": {"budget": 24, "attention": "standard"},
    "custom-full": {"method": "full", "attention": "custom"},
    "standard-full-external": {"method": "full", "attention": "standard", "external_data_threshold": 1024},
    "standard-b24-fp16": {"budget": 24, "attention": "standard", "dtype": "float16"},
    "custom-b24-fp16": {"budget": 24, "attention": "custom", "dtype": "float16"},
}
REPO = Path(__file__).resolve().parents[2]
EXPORT_SCRIPT = Path(sys.executable).with_name("sparsemm-export")

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, _NoTorch())
"""


def engines_root(tmp_path_factory) -> Path:
    """A folder shared by every xdist worker of this session (per session, never reused across runs)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-engines"
    root.mkdir(parents=True, exist_ok=True)
    return root


def engine_folder(name: str, tmp_path_factory) -> Path:
    """The engine ``name`` of ``ENGINES``, exported by the first worker that asks for it."""
    root = engines_root(tmp_path_factory)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "manifest.json").exists():
            options = dict(ENGINES[name])
            if options.pop("cli", False):
                done = subprocess.run(
                    [str(EXPORT_SCRIPT), "--model", "tiny", "--out", str(folder)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert done.returncode == 0, done.stderr
            else:
                export_model("tiny", folder, **options)
    return folder


def run_without_torch(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing torch or transformers raises ImportError."""
    script = BLOCK_TORCH + code + "\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
