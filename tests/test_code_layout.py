"""The layout rules of docs/architecture.md, checked: arrows point down, modules and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cospress"
STAGES = ("extract", "distill", "evaluate")
TOP = (
    "cli",
    "cli_store",
    "cli_ui",
    "flags",
    "api",
    "__main__",
)  # the command line: imports everything, imported by nothing
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Triton kernels: one long body each, by the nature of a fused kernel (docs/architecture.md).
EXEMPT_FUNCTIONS = {("fused_kl.py", "_kernels")}


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _place(path: Path) -> str:
    """'extract' / 'distill' / 'evaluate' for a stage module, 'cli' for the command line, else 'ground'."""
    rel = path.relative_to(PKG)
    if rel.parts[0] in STAGES:
        return rel.parts[0]
    return "cli" if rel.stem in TOP else "ground"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "cospress" or n.startswith("cospress.")}


def _target(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "cli" if len(parts) > 1 and parts[1] in TOP else "ground"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_arrows_point_down(path: Path) -> None:
    place = _place(path)
    for module in _imports(path):
        target = _target(module)
        if place == "ground":
            assert target == "ground", f"{path.name}: the shared ground imports {module}"
        elif place in STAGES:
            assert target in ("ground", place), f"{path.name}: stage {place} imports {module}"
        assert target != "cli" or place == "cli", f"{path.name} imports the command line ({module})"


def test_modules_and_functions_are_short() -> None:
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text()
        rel = str(path.relative_to(PKG))
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{rel} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (path.name, node.name) not in EXEMPT_FUNCTIONS:
                    long_functions.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
