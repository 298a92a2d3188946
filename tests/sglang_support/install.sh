#!/usr/bin/env bash
# Install SGLang 0.5.23 into an existing venv (torch 2.13 CPU + this project already installed) so that
# tests/serving/sglang/test_sglang_serving.py can serve a model on a CPU-only machine. Test-only. SGLang then needs the
# shim in pythonpath/ at run time (the tests put it on PYTHONPATH themselves; see README.md).
#
#   usage: bash tests/sglang_support/install.sh VENV
set -euo pipefail

VENV=${1:?usage: install.sh VENV}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

# pip lists every requirement of SGLang's that is deliberately not installed; drop that expected noise.
drop_expected_conflicts() {
    grep -v -e "^sglang 0\.5\.23 requires " \
        -e "^ERROR: pip's dependency resolver does not currently take into account" || true
}

# SGLang without its declared requirements: they pin torch==2.14.1 / transformers==5.19.0 and pull
# CUDA-only wheels. What it really needs on CPU is in requirements.txt.
"${PIP[@]}" install --no-deps sglang==0.5.23 2>&1 | drop_expected_conflicts

# torchvision (imported by SGLang at start-up) without deps, which would replace CPU torch with a CUDA
# build. 0.28.0 is the release built against torch 2.13; on PyPI it is the CUDA build, whose C++ ops
# cannot load on CPU torch: pythonpath/torchvision_cpu_hook.py makes the rest of it importable.
"${PIP[@]}" install --no-deps torchvision==0.28.0

# torch stays pinned through the repo's constraints (a dependency asking for another torch fails here).
"${PIP[@]}" install -c "$REPO/constraints.txt" -r "$HERE/requirements.txt" 2>&1 | drop_expected_conflicts

# Smoke check, with the test-only shim on PYTHONPATH the way the tests use it.
PYTHONPATH="$HERE/pythonpath" "$PY" -W ignore -c \
    "import sglang.launch_server, sglang.srt.models.qwen2_vl, sglang.srt.multimodal.processors.qwen_vl"
echo "sglang installed into $VENV: $("$PY" -c 'import importlib.metadata as m; print(m.version("sglang"))')"
