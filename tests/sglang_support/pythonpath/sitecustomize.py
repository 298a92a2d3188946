"""Test-only: arm the torchvision hook in every interpreter started with this folder on ``PYTHONPATH``.

Why a ``sitecustomize``: the SGLang server under test is several interpreters (the HTTP server plus
scheduler and detokenizer processes started by ``multiprocessing``), and each one imports torchvision.
``site`` imports ``sitecustomize`` at start-up in every one of them, and they all inherit
``PYTHONPATH`` from the launcher, so putting this folder there reaches all of them without touching
site-packages. The same folder makes the ``sgl_kernel`` stand-in importable.

Caveat: this shadows any other ``sitecustomize`` further down ``sys.path`` (none in a plain venv).
"""

import torchvision_cpu_hook

torchvision_cpu_hook.install()
