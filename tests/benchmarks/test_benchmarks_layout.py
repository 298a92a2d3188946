"""The benchmarks are a small library with one way to do each shared thing: no module reaches into another's private
names, one allocator table, one launcher of measured child processes."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
#: Who may start processes: the measured-child launcher, the SGLang server launcher, kvpress's venv installer.
STARTS_PROCESSES = {"common.py", "serve.py", "arms.py"}


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(BENCHMARKS.glob("*.py"))}


def _strings(tree: ast.Module) -> list[str]:
    """String constants outside docstrings and comments."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}  # fmt: skip
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]  # fmt: skip


def test_no_benchmark_imports_a_private_name_from_another():
    bad = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_one_allocator_table_and_one_child_launcher():
    modules = _modules()
    tables = [name for name, tree in modules.items() if any(s.startswith("MALLOC_") for s in _strings(tree))]
    assert tables == ["common.py"], tables  # glibc's settings are named in common.ALLOCATORS only
    starters = {name for name, tree in modules.items() if "subprocess" in _imports(tree)}
    assert starters <= STARTS_PROCESSES, starters - STARTS_PROCESSES  # measured children: common.run_child only
    launcher = [n for n in ast.walk(modules["common.py"]) if isinstance(n, ast.FunctionDef) and n.name == "run_child"]
    assert len(launcher) == 1


def test_no_benchmark_patches_a_project_class():
    """No assignment to an attribute of something imported from sparsemm (a subclass is the way to adapt one)."""
    bad = []
    for name, tree in _modules().items():
        project = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("sparsemm") for a in n.names}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id in project
                    ):
                        bad.append(f"{name}:{node.lineno} {target.value.id}.{target.attr}")
    assert not bad, bad
