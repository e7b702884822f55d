"""The benchmark scripts run end to end at toy sizes (slow: ``pytest -m slow``, after
``pip install -e ".[bench,robot]"`` and ``pip install --no-deps torchcfm``; the density scripts
take about a minute together, the robot ones a few minutes each).

A benchmark is run rarely and by hand, so a script can stop working unnoticed when the library
changes under it (a new input check refusing what it passes, a renamed argument). Each case runs
one script as a user would, in its own process with one thread, at sizes that take seconds; what it
writes goes to a temporary folder (``FLOWFORGE_BENCHMARK_RESULTS``), never over measured results.
The figures at these sizes mean nothing; the test checks that every phase runs and writes its table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: script -> (peer libraries it needs, its arguments at toy sizes; {work} is a scratch folder)
SCRIPTS = {
    "autoregressive_speed": (
        ("zuko",),
        "--features 4 --transforms 1 --hidden 8 8 --batch 16 --samples 16 --train-repeats 1 --sample-repeats 1 "
        "--warmup 0 --sample-warmup 0 --threads 1",
    ),
    "cnf_regularisation": (
        ("zuko", "torchdiffeq"),
        "--steps 2 --batch 16 --hidden 8 8 --tol 1e-3 --test-size 64 --threads 1 --datasets pinwheel",
    ),
    "density_quality_2d": (("zuko",), "--steps 2 --batch 16 --transforms 1 --hidden 8 8 --bins 4 --seeds 0"),
    "flow_matching_digits": (
        (),
        "--work {work} --steps 2 --batch 16 --channels 8 --shortcut-halvings 1 --ct-intervals 2 4 --glow-steps 2 "
        "--threads 1",
    ),
    "flow_matching_few_step": (
        ("flow_matching", "torchcfm", "ot"),
        "--datasets moons --steps 2 --batch 16 --hidden 8 8 --reflow-pairs 32 --samples 32 --nfe 1 2 --repeats 2 "
        "--threads 1 --distillation-intervals 2 --speed-hidden 8 8",
    ),
    "glow_digits": (
        ("normflows",),
        "--steps 2 --batch 8 --levels 2 --flow-steps 1 --hidden 8 --draws 1 --seeds 0 --threads 1",
    ),
    "realnvp_vs_zuko": (("zuko",), "--steps 2 --batch 16 --transforms 2 --hidden 8 8 --seeds 0"),
    "vae_digits": (
        (),
        "--work {work} --seeds 0 --steps 3 --batch 16 --latent 2 --hidden 8 8 --iaf-transforms 1 --flow-hidden 8 8 "
        "--context 4 --prior-transforms 1 --prior-hidden 8 8 --k 2 --threads 1",
    ),
    "ddp_step_time": ((), "--batch 16 --rows 256 --steps 2 --repeats 1 --warmup 1 --processes 2"),
    # The robot benchmarks: every model, phase and execution method, on one or two tasks.
    "policy_mt10": (
        ("metaworld",),
        "--work {work} --tasks reach-v3,push-v3 --models flow,hierarchical,mse,ddpm --demos 2 --steps 20 "
        "--episodes 1 --ddpm100-episodes 1 --noise-scales 1,0.5 --validation-episodes 1 --image-tasks reach-v3 "
        "--image-demos 2 --image-steps 20 --image-episodes 1 --image-batch 8 --latency-repeats 3 --threads 1",
    ),
    "policy_realtime": (
        ("metaworld",),
        "--work {work} --tasks reach-v3,push-v3 --demos 2 --steps 20 --distill-steps 20 --episodes 1 --delays 0,4 "
        "--candidates 2 --few-step-noise-scales 1 --validation-episodes 1 --latency-repeats 3 --likelihood-frames 16 "
        "--threads 1",
    ),
    "policy_vision": (
        ("metaworld",),
        "--work {work} --tasks reach-v3 --ablation-tasks reach-v3 --dart-tasks reach-v3 --demos 1 --steps 20 "
        "--fine-tune-steps 20 --ablation-steps 20 --batch 8 --episodes 1 --baseline-episodes 1 --ablation-episodes 1 "
        "--validation-episodes 1 --noise-scales 1,0.5 --action-steps 4,2 --max-steps 50 --throughput-steps 3 "
        "--step-time-steps 2 --render-frames 20 --threads 1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_script_runs_and_writes_its_table(script: str, tmp_path: Path) -> None:
    peers, arguments = SCRIPTS[script]
    missing = [peer for peer in peers if importlib.util.find_spec(peer) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (the bench extra)")
    results = tmp_path / "results"
    env = {**os.environ, "FLOWFORGE_BENCHMARK_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    env.setdefault("MUJOCO_GL", "egl")
    command = [sys.executable, str(BENCHMARKS / f"{script}.py"), *arguments.format(work=tmp_path / "work").split()]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    table = json.loads((results / f"{script}.json").read_text())  # written where it was told, and whole
    assert table
