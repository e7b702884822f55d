"""The command line: the demo trains, reports a test NLL and writes its plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flowforge import __version__
from flowforge.cli import app

runner = CliRunner()


def test_demo_trains_reports_and_plots(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["demo", "--steps", "150", "--transforms", "2", "--out", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    nll = float(re.search(r"test NLL = (-?[\d.]+) nats", result.output).group(1))
    assert nll < 2.5  # a fresh N(0, I) flow scores about 2.9 nats on these moons
    png = tmp_path / "realnvp_moons.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_demo_refuses_unknown_names(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--dataset", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown data set 'nope'" in result.output
    result = runner.invoke(app, ["demo", "--model", "glow9", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown model" in result.output


def test_module_entry_point_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "flowforge", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"flowforge {__version__}"
