"""The house rule that makes simulation possible: core/ does no I/O and owns no clock or
global randomness (DESIGN.md)."""

from __future__ import annotations

import ast
import pathlib

import leaderless.core

CORE = pathlib.Path(leaderless.core.__file__).parent
FORBIDDEN_MODULES = {"asyncio", "socket", "threading", "time", "selectors", "subprocess",
                     "multiprocessing", "aiohttp", "uvloop", "os"}
RANDOM_FUNCTIONS = {"random", "randint", "randrange", "choice", "choices", "shuffle",
                    "sample", "uniform", "gauss", "seed", "getrandbits"}


def _modules() -> list[pathlib.Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_imports_no_io_modules() -> None:
    offences = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                if root in FORBIDDEN_MODULES or name.startswith("leaderless.runtime"):
                    offences.append(f"{path.name}: imports {name}")
    assert offences == []


def test_core_never_calls_module_level_random() -> None:
    offences = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "random":
                bad = [a.name for a in node.names if a.name in RANDOM_FUNCTIONS]
                if bad:
                    offences.append(f"{path.name}: from random import {bad}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "random"
                    and node.func.attr in RANDOM_FUNCTIONS):
                offences.append(f"{path.name}:{node.lineno}: random.{node.func.attr}()")
    assert offences == []
