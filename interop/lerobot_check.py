"""Check LeRobot v3.0 compatibility both ways against the real ``lerobot`` package.

Needs flowforge with the ``robot`` extra (this Python) and lerobot 0.6.1 in a separate virtual
environment on Python 3.12 (it brings its own torch, so it is never a dependency of flowforge)::

    python3.12 -m venv /work/lerobot-venv
    /work/lerobot-venv/bin/pip install "lerobot[dataset,training]==0.6.1"
    python interop/lerobot_check.py --lerobot-python /work/lerobot-venv/bin/python

flowforge -> lerobot: ``flowforge data collect`` writes two folders (state, full state, actions,
84x84 camera images) and a third with action noise (``action.executed``); lerobot opens each and
reads every frame, trains ACT on one for a few steps
with ``lerobot-train`` (defaults, on the CPU, without downloading pretrained backbone weights),
resumes recording into a copy (one more episode with lerobot's own recorder) and merges the two
with ``aggregate_datasets``; flowforge reads the resumed and the merged folders back.

lerobot -> flowforge: ``tests/fixtures/lerobot_v3/make_fixture.py`` writes a folder with
lerobot's own writer (state, image and video features, two episodes) and what lerobot reads from
it; flowforge's ``EpisodeDataset`` must read the same values (``tests/test_lerobot_format.py``
checks the committed copy of that fixture in every test run).

Prints one line per check and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lerobot(python: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([python, *args], capture_output=True, text=True, env=env, cwd=cwd)


def _json_line(result: subprocess.CompletedProcess) -> dict:
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lerobot-python", default="/work/lerobot-venv/bin/python")
    parser.add_argument("--work", type=Path, default=Path("interop-work"))
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    from flowforge.data.episodes import EpisodeDataset
    from flowforge.envs.collect import collect

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    side = str(ROOT / "interop" / "lerobot_side.py")
    version = _lerobot(args.lerobot_python, "-c", "import importlib.metadata as m; print(m.version('lerobot'))")
    print(f"lerobot {version.stdout.strip()} ({args.lerobot_python})")
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, action) -> object:
        try:
            detail = action()
            checks.append((name, True, str(detail)))
            print(f"PASS  {name}: {detail}", flush=True)
            return detail
        except Exception as error:
            checks.append((name, False, str(error)))
            print(f"FAIL  {name}: {str(error)[-2000:]}", flush=True)
            return None

    # ---------------------------------------------------------------- flowforge -> lerobot
    first, second, noisy = work / "ours_a", work / "ours_b", work / "ours_action_noise"
    collect(["reach-v3", "push-v3"], 1, first, images=True, progress=False)
    collect(["drawer-open-v3"], 2, second, images=True, progress=False)
    collect(["reach-v3"], 2, noisy, action_noise=0.1, progress=False)  # with action.executed
    for folder in (first, second, noisy):
        ours = EpisodeDataset(folder)

        def opened(folder=folder, ours=ours) -> str:
            found = _json_line(_lerobot(args.lerobot_python, side, "open", str(folder)))
            assert found["frames"] == len(ours), (found["frames"], len(ours))
            assert found["episodes"] == len(ours.lengths)
            assert found["tasks"] == sorted(set(ours.tasks.values()) if isinstance(ours.tasks, dict) else ours.tasks)
            assert {"q01", "q10", "q50", "q90", "q99", "count"} <= set(found["stats_keys"])
            assert sorted(found["features"]) == sorted(ours.features), (found["features"], list(ours.features))
            return f"{found['frames']} frames, {found['episodes']} episodes, features {found['features']}"

        check(f"lerobot opens {folder.name} and reads every frame", opened)

    def trained() -> str:
        output = work / "act-train"
        result = _lerobot(
            args.lerobot_python.replace("/python", "/lerobot-train"),
            f"--dataset.repo_id=local/{first.name}",
            f"--dataset.root={first}",
            "--policy.type=act",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--policy.pretrained_backbone_weights=null",
            f"--steps={args.train_steps}",
            "--batch_size=2",
            "--num_workers=0",
            f"--save_freq={args.train_steps}",
            f"--output_dir={output}",
            cwd=work,
        )
        if result.returncode != 0:
            raise RuntimeError((result.stdout + result.stderr)[-3000:])
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "step:" in line or "loss" in line]
        return (lines[-1].strip() if lines else "finished") + f"; checkpoint in {output.name}"

    check(f"lerobot-train (ACT) runs {args.train_steps} steps on {first.name}", trained)

    resumed = work / "ours_a_resumed"
    shutil.copytree(first, resumed, symlinks=False)

    def resume() -> str:
        found = _json_line(_lerobot(args.lerobot_python, side, "resume", str(resumed)))
        before = EpisodeDataset(first)
        assert found["episodes"] == len(before.lengths) + 1, found
        again = EpisodeDataset(resumed)
        assert len(again.lengths) == found["episodes"] and len(again) == found["frames"]
        again[len(again) - 1]  # flowforge reads lerobot's appended episode
        return f"lerobot appended an episode: {found['episodes']} episodes; flowforge reads all {len(again)} frames"

    check("lerobot resumes recording into a flowforge folder", resume)

    merged = work / "merged"

    def aggregate() -> str:
        found = _json_line(_lerobot(args.lerobot_python, side, "aggregate", str(merged), str(first), str(second)))
        a, b = EpisodeDataset(first), EpisodeDataset(second)
        assert found["frames"] == len(a) + len(b) and found["episodes"] == len(a.lengths) + len(b.lengths)
        ours = EpisodeDataset(merged)
        assert len(ours) == found["frames"]
        ours[len(ours) - 1]
        return f"{found['episodes']} episodes, {found['frames']} frames; flowforge reads the merged folder"

    check("lerobot aggregate_datasets merges two flowforge folders", aggregate)

    # ---------------------------------------------------------------- lerobot -> flowforge
    written = work / "lerobot_written"

    def lerobot_written() -> str:
        written.mkdir()
        script = written / "make_fixture.py"  # it writes next to itself: a fresh copy, not the committed one
        shutil.copy(ROOT / "tests" / "fixtures" / "lerobot_v3" / "make_fixture.py", script)
        result = _lerobot(args.lerobot_python, str(script))
        if result.returncode != 0:
            raise RuntimeError((result.stdout + result.stderr)[-3000:])
        test = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_lerobot_format.py")],
            capture_output=True,
            text=True,
            env={**os.environ, "FLOWFORGE_LEROBOT_FIXTURE": str(written)},
            cwd=ROOT,
        )
        if test.returncode != 0:
            raise RuntimeError(test.stdout[-3000:])
        return test.stdout.strip().splitlines()[-1]

    check("flowforge reads a folder lerobot just wrote exactly (tests/test_lerobot_format.py)", lerobot_written)

    failed = [name for name, passed, _ in checks if not passed]
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed")
    (work / "summary.json").write_text(json.dumps([{"check": n, "passed": p, "detail": d} for n, p, d in checks]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
