"""The README's code examples run as written, its first two commands stay the set-up commands, and
the names and documents it and docs/ point to exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The README and the longer documents it points to.
DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
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


def test_every_dotted_name_the_documents_show_exists() -> None:
    """``flowforge.a.b.C`` in the README or docs/: a module, or an attribute of the longest importable prefix."""
    import importlib

    text = "\n".join(d.read_text() for d in DOCUMENTS)
    names = sorted(set(re.findall(r"flowforge(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)))
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


#: A path into the repository as the documents write it: ``docs/benchmarks/x.md``, ``benchmarks/x.py``, ...
REPOSITORY_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|configs|interop)/[\w./-]*\.(?:md|py|toml))")


#: Code whose docstrings and comments point to documents (a run log, a config).
CODE = sorted([*(ROOT / "src" / "flowforge").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def test_every_file_the_documents_point_to_exists() -> None:
    """Every path such as ``docs/benchmarks/x.md``, ``benchmarks/x.py`` or ``configs/x.toml`` in the
    README, docs/ or the code's own docstrings and comments names a file of the repository, and the
    README points to every document in docs/."""
    pointed = {(d, p) for d in [*DOCUMENTS, *CODE] for p in REPOSITORY_PATH.findall(d.read_text())}
    assert len(pointed) > 10
    assert any(d in CODE and p.startswith("docs/") for d, p in pointed)
    missing = sorted(f"{d.name}: {p}" for d, p in pointed if not (ROOT / p).is_file())
    assert missing == []
    from_readme = set(REPOSITORY_PATH.findall(README.read_text()))
    unlinked = [str(d.relative_to(ROOT)) for d in DOCUMENTS[1:] if str(d.relative_to(ROOT)) not in from_readme]
    assert unlinked == []
