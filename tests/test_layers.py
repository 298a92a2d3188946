"""Package layers: every import edge between sparsemm's layers (lazy imports too) must be on the allowed list.

Layers, lowest first (DESIGN §2):

* ``base``     errors, file I/O, model signature, model resolution and loading, the guard: imports nothing internal
* ``profiles`` → base
* ``plan``     the plan file and knob declarations (``plugin.plan``, ``plugin.knobs``) → base only; importable
               without torch and without the profiler
* ``methods``  the budget methods, plan building and the knobs as flags (``plugin.budgets``, ``plugin.planning``,
               ``plugin.knob_flags``) → base, profiles, plan
* ``plugin``   the rest of the plugin (selection, pages, runtime, attention) → base, plan, plugin
* ``models``   the shipped model and its data → base
* ``serving``  engine adapters → base, profiles, plan, methods, plugin
* ``export``   ONNX engines → base, plan, methods, plugin, serving (to trace; never SGLang)
* ``app``      CLI, evaluation, reports, plots, progress, the trainer script → everything; nothing imports it
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {  # package -> folder, as setup.cfg's package_dir maps them
    "sparsemm": REPO / "sparsemm",
    "sparsemm.plugin": REPO / "plugin",
    "sparsemm.profiles": REPO / "profiles",
    "sparsemm.serving": REPO / "serving",
    "sparsemm.export": REPO / "export",
    "sparsemm.models": REPO / "models",
}
ALLOWED = {
    "base": {"base"},
    "profiles": {"base", "profiles"},
    "plan": {"base", "plan"},
    "methods": {"base", "profiles", "plan", "methods"},
    "plugin": {"base", "plan", "plugin"},
    "models": {"base", "models"},
    "serving": {"base", "profiles", "plan", "methods", "plugin", "serving"},
    "export": {"base", "plan", "methods", "plugin", "serving", "export"},
    "app": {"base", "profiles", "plan", "methods", "plugin", "models", "serving", "export", "app"},
}
#: Third-party engines a layer must never import (the plugin knows no engine; export never reaches SGLang).
FORBIDDEN = {
    "plan": {"torch", "transformers", "sglang", "onnx", "onnxruntime"},
    "plugin": {"transformers", "sglang", "onnx", "onnxruntime"},
    "methods": {"transformers", "sglang", "onnx", "onnxruntime"},
    "export": {"sglang"},
    "base": {"sglang", "onnx", "onnxruntime"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["sparsemm", "app"] or module == "sparsemm.models.train":
        return "app"  # the trainer is a script (main()), not part of the shipped model's package data
    if module in ("sparsemm.plugin.plan", "sparsemm.plugin.knobs"):
        return "plan"
    if module in ("sparsemm.plugin.budgets", "sparsemm.plugin.planning", "sparsemm.plugin.knob_flags"):
        return "methods"
    if len(parts) >= 2 and parts[1] in ("plugin", "profiles", "serving", "export", "models"):
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


def test_every_internal_import_edge_is_allowed():
    known = modules()
    bad = []
    for module, path in sorted(known.items()):
        src = layer_of(module)
        for name in sorted(imports_of(path)):
            top = name.split(".")[0]
            if top in FORBIDDEN.get(src, ()):
                bad.append(f"{module} ({src}) imports the engine {name}")
            if top != "sparsemm" or name not in known:
                continue
            dst = layer_of(name)
            if dst not in ALLOWED[src]:
                bad.append(f"{module} ({src}) -> {name} ({dst})")
    assert not bad, "import edges outside the layer rules:\n" + "\n".join(bad)


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
