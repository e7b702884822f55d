"""The README's code examples run as written, and its first two commands stay the set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_readme_example_runs(block: str) -> None:
    exec(compile(block, str(README), "exec"), {})


def test_readme_opens_with_the_two_setup_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "flowforge train configs/" in first_block[0] and "pytest" in first_block[1]
    config = re.search(r"flowforge train (\S+)", first_block[0]).group(1)
    assert (README.parent / config).is_file(), f"the main job's config {config} is missing"
    ci = (README.parent / ".ci" / "run").read_text()
    for command in first_block[1].split(" && "):
        assert command in ci, f"{command!r} is not run by .ci/run"


def test_every_dotted_name_the_readme_shows_exists() -> None:
    """``flowforge.a.b.C`` in the README: a module, or an attribute of the longest importable prefix."""
    import importlib

    names = sorted(set(re.findall(r"flowforge(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README.read_text())))
    assert names
    missing = []
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert missing == []
