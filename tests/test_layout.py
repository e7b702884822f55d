"""The house's layout: no import circles, lower floors never import upper ones, every module imports alone,
and the README's Layout section names every module."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "flowforge"

# Floors from DESIGN.md, lowest first. A module may import its own floor and the floors below.
FLOORS = [
    {"errors", "utils", "registry", "config", "validation", "checkpoint"},
    {"nn", "distributions", "ode"},
    {"transforms"},
    {"matching", "flows"},
    {"train", "eval", "data"},
    {"runs", "policy", "envs"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """flowforge modules imported anywhere in the file (a lazy import inside a function still depends)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowforge"):
            for alias in node.names:  # `from flowforge import runs` imports the module flowforge.runs
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULE_FILES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flowforge"))
    return found


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}
MODULE_FILES = set(MODULES)
GRAPH = {name: {m for m in _imports(path) if m in MODULES} for name, path in MODULES.items()}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    for level, names in enumerate(FLOORS):
        if parts[1] in names:
            return level
    raise AssertionError(f"{module} is on no floor of DESIGN.md's layout; add it to FLOORS")


def test_no_module_imports_a_higher_floor() -> None:
    upward = []
    for module, imported in GRAPH.items():
        mine = _floor(module)
        for other in imported:
            theirs = _floor(other)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {other}")
    assert upward == []


def test_no_import_circle_between_modules() -> None:
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for other in sorted(GRAPH[module]):
            if other == module:
                continue
            if state.get(other) == 1:
                circles.append(" -> ".join([*stack[stack.index(other) :], other]))
            elif other not in state:
                visit(other, [*stack, other])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module imported first, in a fresh process (forked after torch alone is loaded)."""
    script = textwrap.dedent(
        """
        import os, sys, traceback
        import torch  # noqa: F401 - third-party start-up cost paid once, before any flowforge import
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    __import__(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED", *failed)
        sys.exit(1 if failed else 0)
        """
    )
    names = sorted(m for m in MODULES if m != "flowforge.__main__")
    result = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600, env={**os.environ}
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_readme_layout_names_every_module() -> None:
    layout = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    missing = []
    for name, path in MODULES.items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = path.parent.name + "/"
        if path.name not in layout and not (path.parent != SOURCE and re.search(rf"^\s*{folder}\s", layout, re.M)):
            missing.append(name)
    assert missing == [], f"README's Layout section does not mention {missing}"


def test_the_policy_package_never_imports_a_simulator() -> None:
    offenders = [
        f"{name} -> {other}"
        for name, imported in GRAPH.items()
        if name.startswith("flowforge.policy")
        for other in imported
        if other.startswith("flowforge.envs")
    ]
    offenders += [
        name
        for name, path in MODULES.items()
        if name.startswith("flowforge.policy")
        and re.search(r"^\s*(import|from) (metaworld|mujoco|gymnasium)", path.read_text(), re.M)
    ]
    assert offenders == []
