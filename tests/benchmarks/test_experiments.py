"""Benchmark scripts stay runnable where they live (benchmarks/ and benchmarks/experiments/): each puts the
repository root on sys.path, and every `benchmarks.*` name it imports exists. Checked from the source, so
that GPU-only scripts are checked on CPU too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support.paths import ROOT

SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if p.name != "__init__.py")


def top_level_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def module_file(dotted: str) -> Path:
    return ROOT.joinpath(*dotted.split(".")).with_suffix(".py")


def test_there_are_experiments():
    assert any(p.parent.name == "experiments" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_finds_the_repository_and_what_it_imports(script):
    source = script.read_text()
    for depth in re.findall(r"sys\.path\.insert\(0, str\(Path\(__file__\)\.resolve\(\)\.parents\[(\d)\]\)\)", source):
        assert script.resolve().parents[int(depth)] == ROOT, f"{script.name} puts the wrong directory on sys.path"
    for node in ast.walk(ast.parse(source)):  # imports inside functions too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
            if node.module == "benchmarks":  # from benchmarks import local_serve
                for alias in node.names:
                    assert module_file(f"benchmarks.{alias.name}").is_file(), f"{script.name}: {alias.name}"
                continue
            target = module_file(node.module)
            assert target.is_file(), f"{script.name} imports {node.module}, which does not exist"
            missing = {a.name for a in node.names} - top_level_names(target)
            assert not missing, f"{script.name} imports {sorted(missing)} from {node.module}, which lacks them"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "benchmarks":
                    assert module_file(alias.name).is_file(), f"{script.name} imports {alias.name}"
