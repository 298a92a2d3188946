"""Package layers: every import edge between sparsemm's layers (lazy imports too) must be on the allowed list.

Layers, lowest first (README "Design"):

* ``base``     errors, file I/O, model signature, model resolution and loading, the guard: imports nothing internal
* ``profiles`` → base
* ``plan``     the plan file and knob declarations (``plugin.plan``, ``plugin.knobs``) → base only; importable
               without torch and without the profiler
* ``methods``  the budget methods, plan building and the knobs as flags (``plugin.budgets``, ``plugin.recipe``,
               ``plugin.knob_flags``) → base, profiles, plan
* ``plugin``   the rest of the plugin (selection, pages, runtime, attention) → base, plan, plugin
* ``models``   the shipped model and its data → base
* the adapters, each on the plugin and never on each other: ``hf`` (``serving.hf``), ``sglang``
  (``serving.sglang``), ``loadtest`` (``serving.loadtest``, which needs nothing but the base) and ``export``. The one
  written exception: ``export.torch_reference``, the exporter's oracle, runs the transformers adapter
  (``EXCEPTIONS``): an engine folder is checked against the path it must equal.
* ``app``      CLI, evaluation, reports, plots, progress, the trainer script → everything; nothing imports it
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {  # package -> folder, as setup.cfg's package_dir maps them
    "sparsemm": REPO / "sparsemm",
    "sparsemm.plugin": REPO / "plugin",
    "sparsemm.profiles": REPO / "profiles",
    "sparsemm.serving": REPO / "serving",
    "sparsemm.export": REPO / "export",
    "sparsemm.models": REPO / "models",
}
CORE = {"base", "profiles", "plan", "methods", "plugin"}
ALLOWED = {
    "base": {"base"},
    "profiles": {"base", "profiles"},
    "plan": {"base", "plan"},
    "methods": {"base", "profiles", "plan", "methods"},
    "plugin": {"base", "plan", "plugin"},
    "models": {"base", "models"},
    "serving": {"base"},  # the serving package itself: a docstring, no adapter
    "hf": CORE | {"hf"},
    "sglang": CORE | {"sglang"},
    "loadtest": {"base", "loadtest"},
    "export": CORE | {"export"},
    "app": CORE | {"models", "serving", "hf", "sglang", "loadtest", "export", "app"},
}
#: The written exceptions: (importing module, imported module) edges outside the layer rules, with the reason.
EXCEPTIONS = {
    ("sparsemm.export.torch_reference", "sparsemm.serving.hf"): "the exporter's oracle is the transformers path",
    ("sparsemm.export.torch_reference", "sparsemm.serving.hf.generate"): "the same edge, by name",
}
#: Third-party engines a layer must never import (the plugin knows no engine; export never reaches SGLang).
FORBIDDEN = {
    "plan": {"torch", "transformers", "sglang", "onnx", "onnxruntime"},
    "plugin": {"transformers", "sglang", "onnx", "onnxruntime"},
    "methods": {"transformers", "sglang", "onnx", "onnxruntime"},
    "export": {"sglang"},
    "loadtest": {"torch", "transformers", "sglang"},
    "base": {"sglang", "onnx", "onnxruntime"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["sparsemm", "app"]:
        return "app"
    if module in ("sparsemm.plugin.plan", "sparsemm.plugin.knobs"):
        return "plan"
    if module in ("sparsemm.plugin.budgets", "sparsemm.plugin.recipe", "sparsemm.plugin.knob_flags"):
        return "methods"
    if parts[:2] == ["sparsemm", "serving"]:
        adapter = {"hf": "hf", "sglang": "sglang", "loadtest": "loadtest"}
        return adapter.get(parts[2], "serving") if len(parts) > 2 else "serving"
    if len(parts) >= 2 and parts[1] in ("plugin", "profiles", "export", "models"):
        return parts[1]
    return "base"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "sparsemm" and parts and parts[0] in ("plugin", "profiles", "serving", "export", "models"):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(edges: dict[str, set[str]], known: set[str]) -> list[str]:
    """The edges (module → names it imports) outside the layer rules and the written exceptions."""
    bad = []
    for module, names in sorted(edges.items()):
        src = layer_of(module)
        for name in sorted(names):
            top = name.split(".")[0]
            if top in FORBIDDEN.get(src, ()):
                bad.append(f"{module} ({src}) imports the engine {name}")
            if top != "sparsemm" or name not in known or (module, name) in EXCEPTIONS:
                continue
            dst = layer_of(name)
            if dst not in ALLOWED[src]:
                bad.append(f"{module} ({src}) -> {name} ({dst})")
    return bad


def test_every_internal_import_edge_is_allowed():
    known = modules()
    bad = violations({m: imports_of(p) for m, p in known.items()}, set(known))
    assert not bad, "import edges outside the layer rules:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("sparsemm.serving.sglang.plugin", "sparsemm.serving.hf"),
        ("sparsemm.serving.hf", "sparsemm.serving.sglang.config"),
        ("sparsemm.serving.loadtest.runner", "sparsemm.plugin.runtime"),
        ("sparsemm.export.build", "sparsemm.serving.sglang.config"),
        ("sparsemm.export.runner", "sparsemm.serving.hf"),  # the exception is one module, not the package
        ("sparsemm.models.tiny_ocr", "sparsemm.app.cli"),
        ("sparsemm.plugin.runtime", "sparsemm.serving.hf"),
    ],
)
def test_an_adapter_importing_another_is_caught(module, imported):
    """The checker on edges it must refuse: one adapter importing another, a lower layer importing a higher one."""
    known = set(modules())
    assert module in known and imported in known
    assert violations({module: {imported}}, known) == [f"{module} ({layer_of(module)}) -> {imported} "
                                                        f"({layer_of(imported)})"]  # fmt: skip


def test_every_written_exception_is_a_real_edge():
    known = modules()
    for module, name in EXCEPTIONS:
        assert name in imports_of(known[module]), (module, name)


def test_the_layer_map_sees_every_package():
    layers = {layer_of(m) for m in modules()}
    assert layers == set(ALLOWED), f"layers without modules: {set(ALLOWED) - layers}"


def test_plan_file_reads_without_torch_or_the_profiler(tmp_path):
    from sparsemm.plugin.plan import BudgetPlan
    from sparsemm.signature import ModelSignature

    plan = BudgetPlan("snapkv", 12, 4, 3, ModelSignature("t", 2, 4, 2, 8), caps=((8, 8), (8, 8)))
    path = plan.save(tmp_path / "plan.json")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers') or name.startswith('sparsemm.profiles'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sparsemm.plugin.plan import BudgetPlan\n"
        f"print(BudgetPlan.load({str(path)!r}).kept(20).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[12, 12], [12, 12]]"
