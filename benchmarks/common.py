"""Shared pieces of the benchmark scripts: the toy-data split, the maximum-likelihood training loop,
and the stored policy evaluations of the resumable robot benchmarks.

Every script that trains flows side by side uses this one loop, so that all libraries see the same
optimizer (Adam), learning-rate schedule (cosine decay to 0 over the run), gradient clipping and
minibatches. The scripts import it as ``common`` (``python benchmarks/<script>.py`` puts this folder
on ``sys.path``).
"""

from __future__ import annotations

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


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (creating the git-ignored results folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


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
    work.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(recorded, indent=2) + "\n")
    temporary.replace(path)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when there is none or it is not readable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


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
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:  # cut short by a killed process
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
