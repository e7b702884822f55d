"""Shared pieces of the benchmark scripts: the toy-data split, the maximum-likelihood training loop,
and the stored policy evaluations of the resumable robot benchmarks.

Every script that trains flows side by side uses this one loop, so that all libraries see the same
optimizer (Adam), learning-rate schedule (cosine decay to 0 over the run), gradient clipping and
minibatches. The scripts import it as ``common`` (``python benchmarks/<script>.py`` puts this folder
on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.data import toy_dataset

LogProb = Callable[[Tensor], Tensor]

#: Where the scripts write their tables (JSON) and figures: ``benchmarks/results/`` (git-ignored), or
#: the folder ``FLOWFORGE_BENCHMARK_RESULTS`` names (a trial run that must leave measured results alone).
RESULTS_DIR = Path(os.environ.get("FLOWFORGE_BENCHMARK_RESULTS") or Path(__file__).resolve().parent / "results")

LR = 1e-3
CLIP_NORM = 10.0
N_TRAIN = 20_000
N_TEST = 10_000
TEST_SEED_OFFSET = 1000


def toy_split(name: str, seed: int) -> tuple[Tensor, Tensor]:
    """Train and test sets of a built-in 2-D set: ``N_TRAIN`` points drawn with ``seed`` and
    ``N_TEST`` points drawn with ``seed + TEST_SEED_OFFSET``."""
    return toy_dataset(name, N_TRAIN, seed=seed), toy_dataset(name, N_TEST, seed=seed + TEST_SEED_OFFSET)


def batch_indices(n: int, steps: int, batch: int, seed: int) -> Tensor:
    """Minibatch indices for every step, (steps, batch): one shuffle of the data per epoch."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(n // batch, 1)
    epochs = math.ceil(steps / per_epoch)
    rows = [torch.randperm(n, generator=g)[: per_epoch * batch].view(per_epoch, batch) for _ in range(epochs)]
    return torch.cat(rows)[:steps]


def train(
    params: Sequence[nn.Parameter],
    log_prob: LogProb,
    data: Tensor,
    indices: Tensor,
    lr: float = LR,
    clip_norm: float = CLIP_NORM,
) -> tuple[list[float], float]:
    """Maximum-likelihood training (:func:`fit` on ``-log_prob(batch).mean()``)."""
    return fit(params, lambda batch: -log_prob(batch).mean(), data, indices, lr, clip_norm)


def fit(
    params: Sequence[nn.Parameter],
    loss_of: Callable[[Tensor], Tensor],
    data: Tensor,
    indices: Tensor,
    lr: float = LR,
    clip_norm: float = CLIP_NORM,
    after_step: Callable[[], None] | None = None,
) -> tuple[list[float], float]:
    """Minimise ``loss_of(batch)``; returns the wall time of every step and the last loss.

    Adam at ``lr`` with cosine decay to 0 over ``len(indices)`` steps, gradient-norm clipping at
    ``clip_norm``; step ``i`` trains on ``data[indices[i]]``; ``after_step`` runs after each
    optimizer step, untimed (an EMA update, for example).
    """
    steps = indices.shape[0]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    times: list[float] = []
    loss = torch.tensor(float("nan"))
    for idx in indices:
        start = time.perf_counter()
        loss = loss_of(data[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - start)
        if after_step is not None:
            after_step()
    return times, loss.item()


@torch.no_grad()
def test_nll(log_prob: LogProb, data: Tensor) -> float:
    """Mean ``-log_prob`` over ``data`` in nats (inf when it is not finite)."""
    nll = -log_prob(data).mean().item()
    return nll if math.isfinite(nll) else math.inf


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars (masks and other buffers are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (a killed process leaves the old file or the
    new one, never a part), creating the folder."""
    from flowforge.checkpoint import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON value stored in ``path``, or ``None`` when there is none or it is not readable (a
    file cut short by a process killed before atomic writes): a resumable phase then makes it again."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (creating the git-ignored results folder)."""
    write_json(path, payload)
    print(f"wrote {path}")


def _integer_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    allowed = f"an int >= {low}" if high is None else f"an int in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def _finite_number(positive: bool) -> Callable[[str], float]:
    allowed = "a finite number " + ("> 0" if positive else ">= 0")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


#: argparse types of the scripts' options, checked before any work: a count (>= 1), a count that may
#: be 0 (0: none, or that part skipped), a seed, and finite numbers > 0 or >= 0.
positive_int = _integer_at_least(1)
nonnegative_int = _integer_at_least(0)
seed_int = _integer_at_least(0, 2**32 - 1)
positive_float = _finite_number(positive=True)
nonnegative_float = _finite_number(positive=False)


def run_resumable(main: Callable[[], None]) -> None:
    """Run a resumable script's ``main``; Ctrl-C ends it with one line instead of a traceback
    (training saves its step first; finished phases are kept) and exit status 130."""
    from flowforge.train import TrainingInterrupted

    try:
        main()
    except TrainingInterrupted as stop:
        print(f"interrupted: training stopped at step {stop.step}; run the same command again to resume", flush=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished phases are kept)", flush=True)
        raise SystemExit(130) from None


def parse_tasks(option: str, text: str, at_least: int = 1) -> list[str]:
    """A ``--tasks`` option: comma-separated MetaWorld v3 task names, each known and named once, at
    least ``at_least`` of them (with 0, an empty text is none); a ``ValueError`` says what is wrong."""
    from flowforge.config import name_list
    from flowforge.envs.metaworld import INSTRUCTIONS

    tasks = name_list(option, text, INSTRUCTIONS, "MetaWorld v3 task") if text.strip() else []
    if len(tasks) < at_least:
        raise ValueError(f"{option} {text!r}: need at least {at_least} task names")
    return tasks


def claim_work_folder(work: Path, **task_sets: tuple[Sequence[str], Path]) -> None:
    """Bind a work folder to its task sets, ``name=(tasks, data set folder)``: recorded on the first
    run (or read from a data set collected before there was a record), other sets refused later.
    Its data sets, models and evaluations belong to the tasks they were made for (a data set
    collected again with other tasks would hold both). A ``ValueError`` names the sets recorded."""
    path = work / "tasks.json"
    recorded = _json_object(path)  # a record cut short by a killed process is made again
    for name, (_, data) in task_sets.items():
        collected = _json_object(data / "meta" / "collection.json").get("task_list")
        if name not in recorded and isinstance(collected, list):
            recorded[name] = sorted(collected)
    for name, (tasks, _) in task_sets.items():
        if name in recorded and recorded[name] != sorted(tasks):
            raise ValueError(
                f"--{name.replace('_', '-')}: {work} holds the runs of {','.join(recorded[name])}; name those "
                "tasks or give another --work"
            )
        recorded[name] = sorted(tasks)
    write_json(path, recorded)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when there is none or it is not readable."""
    value = read_json(path)
    return value if isinstance(value, dict) else {}


#: Run settings a finished run may differ in from the one asked for: how it reported and saved progress.
UNCOMPARED_SETTINGS = frozenset({"progress", "checkpoint_every"})


def changed_settings(trained: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The settings of a finished run (``trained``: sections of settings, as its checkpoint records
    them) that differ from those ``asked`` for, as ``section.key: trained -> asked``
    (:data:`UNCOMPARED_SETTINGS` aside): a resumable phase must not report a run under other settings."""
    trained, asked = json.loads(json.dumps(trained)), json.loads(json.dumps(asked))
    return [
        f"{section}.{key}: {trained.get(section, {}).get(key)!r} -> {value!r}"
        for section, settings in asked.items()
        if isinstance(settings, dict)
        for key, value in settings.items()
        if key not in UNCOMPARED_SETTINGS and trained.get(section, {}).get(key) != value
    ]


def policy_settings_changed(run: Path, config: Any) -> list[str]:
    """:func:`changed_settings` of the trained policy ``run``'s ``[data]`` and ``[train]`` against
    ``config``'s (a :class:`~flowforge.runs.policy.PolicyRunConfig`, whose folders are absolute)."""
    from dataclasses import asdict

    stored = (read_json(run / "checkpoint.json") or {}).get("metadata", {}).get("policy_run", {})
    return changed_settings(stored, {"data": asdict(config.data), "train": asdict(config.train)})


def refuse_other_settings(folder: Path, changed: list[str], remedy: str = "move it away to train again") -> None:
    """Stop the script when the finished run in ``folder`` was trained under ``changed`` settings, naming them."""
    if changed:
        raise SystemExit(
            f"{folder} was trained with other settings ({'; '.join(changed)}): {remedy}, or ask for its settings"
        )


def model_weights_digest(run: Path) -> str:
    """The SHA-256 of a trained policy run's model weights, as its checkpoint records them."""
    return json.loads((run / "checkpoint.json").read_text())["files"]["model"]["sha256"]


def stored_evaluation(path: Path, run: Path, tasks: Sequence[str], **settings: Any) -> dict | None:
    """The evaluation stored at ``path`` by a resumable benchmark phase, when it rolled out ``run``'s
    present weights (its ``weights`` entry) on ``tasks`` with ``settings`` (compared with its report's
    ``settings``: ``episodes``, ``seed_base``, ``max_steps``, ``sampling``, ...). ``None`` when there
    is none, when it was made with a model trained since or with other tasks or settings, or when the
    file is not readable JSON: then it is made again, never reused."""
    if not path.exists():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict):  # cut short by a killed process
        print(f"{path.name}: not readable JSON; evaluating again", flush=True)
        return None
    recorded = stored.get("settings", {})
    same = (
        stored.get("weights") == model_weights_digest(run)
        and set(stored.get("tasks", {})) == set(tasks)
        and all(recorded.get(key) == value for key, value in settings.items())
    )
    if not same:
        print(f"{path.name}: stored with other weights, tasks or settings; evaluating again", flush=True)
    return stored if same else None


def training_setup(n_test: int = N_TEST) -> dict[str, Any]:
    """The settings every training benchmark shares, for its JSON record."""
    import zuko  # a peer, installed with the bench extra

    return {
        "n_train": N_TRAIN,
        "n_test": n_test,
        "lr": LR,
        "clip_norm": CLIP_NORM,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "zuko": zuko.__version__,
    }
