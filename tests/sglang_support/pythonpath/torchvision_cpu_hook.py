"""Test-only: let the CUDA build of torchvision import on CPU torch (SGLang needs it importable).

Why: SGLang imports torchvision at import time (``sglang/srt/multimodal/processors/qwen_vl.py``), and
the only torchvision on PyPI for torch 2.13 is the CUDA build. Its ``_C.so`` needs libtorch_cuda, so
on CPU torch it fails to load and torchvision's C++ ops are never registered;
``torchvision/_meta_registrations.py`` then calls ``torch.library.register_fake("torchvision::nms")``
(and ``qnms``) unconditionally, and ``import torchvision`` dies with
``RuntimeError: operator torchvision::nms does not exist``. Once torchvision is installed, the same
error also breaks transformers (``transformers.image_utils`` imports torchvision when it is present).

Declaring those two op schemas (no kernels) before torchvision's own import lets it finish; the
pure-Python parts SGLang and transformers use (transforms, ``InterpolationMode``) then work, and
torchvision's C++ ops stay unavailable (a call raises).
"""

import importlib.machinery
import sys
from pathlib import Path


class _DeclareMissingTorchvisionOps:
    """``sys.meta_path`` finder that acts once, on the first ``import torchvision``, then steps aside.

    Lazy so that interpreters which never import torchvision (pip, ...) do not pay for ``import torch``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the imports below from coming back here
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        if spec is None or not spec.submodule_search_locations:
            return None  # torchvision not installed: the normal ImportError follows
        import torch

        # If its compiled ops load (a CPU build, or a GPU machine), torchvision needs no help: declaring
        # the schemas ourselves would then clash with its own registration.
        try:
            for lib in Path(spec.submodule_search_locations[0]).glob("_C.*so"):
                torch.ops.load_library(str(lib))
                return None
        except OSError:
            pass
        # The Library object must stay alive, or its definitions are dropped: keep it in this module's
        # globals, so this module must stay in sys.modules (an import does that; see the test's loader).
        global _TORCHVISION_LIB
        _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the regular finders import the real torchvision


def install() -> None:
    """Arm the hook (idempotent). Must run before anything imports torchvision."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _DeclareMissingTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclareMissingTorchvisionOps())
