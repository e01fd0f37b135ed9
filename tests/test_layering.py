"""Imports point down only: kernels -> ops -> ann -> cache -> sparse -> planner/policies -> models ->
adapters/pipeline/parallel -> world -> eval -> bench -> cli. A module may import its own package or any lower
layer, never a higher one."""

import ast
from pathlib import Path

import longroll

ORDER = {
    "kernels": 0,
    "ops": 1,
    "ann": 2,
    "cache": 3,
    "sparse": 4,
    "planner": 5,
    "policies": 5,
    "models": 6,
    "adapters": 7,
    "pipeline": 7,
    "parallel": 7,
    "world": 8,
    "eval": 9,
    "bench": 10,
    "cli": 11,
}
ROOT = Path(longroll.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("longroll.")}


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ORDER), packages - set(ORDER)


def test_imports_point_down():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if len(rel) < 2:
            continue
        here = rel[0]
        for mod in _imports(path):
            there = mod.split(".")[1]
            if there in ORDER and there != here and ORDER[there] >= ORDER[here]:
                bad.append(f"{'/'.join(rel)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_kernels_hold_triton_only():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not any(m.startswith("longroll.") for m in _imports(path)), path
