"""The Trainer: objectives, schedules, EMA, early stopping, precision, exact resume after SIGKILL."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowforge.checkpoint import CheckpointError, load_tensors, read_manifest
from flowforge.data import target, toy_dataset
from flowforge.distributions import DiagNormal
from flowforge.errors import ConfigError
from flowforge.flows import Flow, RealNVP
from flowforge.matching import FlowMatcher
from flowforge.nn import VelocityMLP
from flowforge.train import (
    FlowMatchingObjective,
    MaximumLikelihood,
    Objective,
    ReverseKL,
    Trainer,
    TrainerConfig,
    learning_rate_factor,
)
from flowforge.transforms import LULinear

RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from flowforge.data import toy_dataset
    from flowforge.flows import RealNVP
    from flowforge.train import MaximumLikelihood, Trainer, TrainerConfig

    torch.set_num_threads(1)
    directory, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    class KilledMidway(MaximumLikelihood):
        calls = 0

        def loss(self, model, batch):
            self.calls += 1
            if self.calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().loss(model, batch)

    torch.manual_seed(123)
    flow = RealNVP(2, transforms=2, hidden=(16,))
    config = TrainerConfig(
        steps=120, batch_size=64, checkpoint_every=25, ema_decay=0.9, warmup_steps=10, progress=False
    )
    data = toy_dataset("moons", 2000, seed=0)
    Trainer(flow, KilledMidway(), config, data=data, directory=directory).fit(resume=resume)
    """
)


def _run(script: Path, directory: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), str(directory), str(kill_at), "1" if resume else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_run_killed_midway_resumes_to_the_same_weights(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    straight = _run(script, tmp_path / "straight", kill_at=0, resume=False)
    assert straight.returncode == 0, straight.stderr
    killed = _run(script, tmp_path / "killed", kill_at=70, resume=False)
    assert killed.returncode == -signal.SIGKILL
    assert read_manifest(tmp_path / "killed")["trainer"]["state"]["step"] == 50  # the last checkpoint before the kill
    assert not list((tmp_path / "killed").glob("*.tmp"))
    resumed = _run(script, tmp_path / "killed", kill_at=0, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    expected = load_tensors(tmp_path / "straight", "model")
    for name, value in load_tensors(tmp_path / "killed", "model").items():
        assert torch.equal(value, expected[name]), name
    rows = list(csv.DictReader((tmp_path / "killed" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(10, 121, 10))
    assert isinstance(Flow.load(tmp_path / "killed"), RealNVP)  # a training checkpoint is also a model checkpoint


def test_ctrl_c_saves_the_finished_step_and_the_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGINT is held until the step in progress ends; the checkpoint then saved resumes exactly."""
    from flowforge.train import TrainingInterrupted

    class InterruptedAt(MaximumLikelihood):
        def __init__(self, at: int | None) -> None:
            self.at, self.calls = at, 0

        def loss(self, model, batch):
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)  # in the middle of a step
            return super().loss(model, batch)

    def run(directory: Path, at: int | None, resume: bool = False):
        torch.manual_seed(5)
        flow = RealNVP(2, transforms=2, hidden=(8,))
        config = TrainerConfig(steps=40, batch_size=16, checkpoint_every=0, ema_decay=0.9, progress=False)
        data = toy_dataset("moons", 400, seed=0)
        return Trainer(flow, InterruptedAt(at), config, data=data, directory=directory).fit(resume=resume), flow

    run(tmp_path / "straight", None)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 17: the checkpoint in .* continue with --resume"):
        run(tmp_path / "stopped", 17)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler of the caller is back
    assert read_manifest(tmp_path / "stopped")["trainer"]["state"]["step"] == 17
    state, _ = run(tmp_path / "stopped", None, resume=True)
    assert state.step == 40
    expected = load_tensors(tmp_path / "straight", "model")
    for name, value in load_tensors(tmp_path / "stopped", "model").items():
        assert torch.equal(value, expected[name]), name


class _Worsening(MaximumLikelihood):
    """Validation gets worse at every check, so the first checkpoint is the best."""

    def __init__(self) -> None:
        self.checks = 0

    def validation(self, model, batch) -> float:
        self.checks += 1
        return float(self.checks)


def test_a_run_that_stopped_early_is_not_trained_again_on_resume(tmp_path: Path) -> None:
    def trainer() -> Trainer:
        torch.manual_seed(0)
        config = TrainerConfig(steps=1000, batch_size=16, eval_every=10, patience=2, progress=False)
        data, held_out = torch.randn(100, 2), torch.randn(20, 2)
        flow = RealNVP(2, transforms=2, hidden=(8,))
        return Trainer(flow, _Worsening(), config, data=data, validation_data=held_out, directory=tmp_path)

    assert trainer().fit().step == 30
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = trainer()
    assert again.fit(resume=True).step == 30
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # left as it was


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = RealNVP(2, transforms=2, hidden=(8,))
    trainer = Trainer(
        flow, MaximumLikelihood(), TrainerConfig(steps=5, batch_size=8), data=torch.randn(50, 2), directory=tmp_path
    )
    trainer.fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        next(flow.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".json" or p.name.startswith("model")}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert after["checkpoint.json"] == before["checkpoint.json"]
    Flow.load(tmp_path)  # still loads, with the old weights


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    flow = RealNVP(2, transforms=2, hidden=(8,))
    Trainer(
        flow, MaximumLikelihood(), TrainerConfig(steps=5, batch_size=8), data=torch.randn(50, 2), directory=tmp_path
    ).fit()
    trainer = Trainer(
        flow,
        MaximumLikelihood(),
        TrainerConfig(steps=5, batch_size=8, lr=0.1),
        data=torch.randn(50, 2),
        directory=tmp_path,
    )
    with pytest.raises(CheckpointError, match="differs in lr"):
        trainer.fit(resume=True)


@pytest.mark.parametrize("step", [-5, 6, 1_000_000])
def test_resume_refuses_an_edited_step_count(tmp_path: Path, step) -> None:
    """A step outside 0..steps (or not an int) would train a finished run again, or never finish."""
    from tests.invariants import edit_checkpoint

    settings = TrainerConfig(steps=5, batch_size=8, warmup_steps=0, progress=False)
    data = torch.randn(50, 2)
    Trainer(RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), settings, data=data, directory=tmp_path).fit()
    (tmp_path / "checkpoint.json").write_text(
        (tmp_path / "checkpoint.json").read_text().replace('"step": 5,', f'"step": {step},', 1)
    )
    with pytest.raises(CheckpointError, match="the manifest was edited"):  # a plain edit
        Trainer(
            RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), settings, data=data, directory=tmp_path
        ).fit(resume=True)
    edit_checkpoint(tmp_path, lambda record: record["trainer"]["state"].__setitem__("step", step))  # saved anew
    model = RealNVP(2, transforms=2, hidden=(8,))
    trainer = Trainer(model, MaximumLikelihood(), settings, data=data, directory=tmp_path)
    with pytest.raises(CheckpointError, match=r"trainer\.state\.step = .*: expected an int in 0\.\.5"):
        trainer.fit(resume=True)


def test_resume_refuses_another_model_or_run_metadata_naming_the_setting(tmp_path: Path) -> None:
    data = torch.randn(50, 2)

    def trainer(data_name: str, **model_options) -> Trainer:
        flow = RealNVP(2, transforms=2, hidden=(8,), **model_options)
        settings = TrainerConfig(steps=5, batch_size=8)
        metadata = {"data": {"name": data_name}}
        return Trainer(flow, MaximumLikelihood(), settings, data=data, directory=tmp_path, metadata=metadata)

    trainer("moons").fit()
    with pytest.raises(CheckpointError, match=r"model\.arguments\.activation.*\"relu\" -> \"tanh\""):
        trainer("moons", activation=torch.nn.Tanh).fit(resume=True)
    with pytest.raises(CheckpointError, match=r"metadata\.data\.name: \"moons\" -> \"checkerboard\""):
        trainer("checkerboard").fit(resume=True)
    # both at once are named together (a model setting derived from a run setting shows next to it)
    both = r"activation\.__class__: \"relu\" -> \"tanh\"; metadata\.data\.name: \"moons\" -> \"checkerboard\""
    with pytest.raises(CheckpointError, match=both):
        trainer("checkerboard", activation=torch.nn.Tanh).fit(resume=True)
    assert trainer("moons").fit(resume=True).step == 5


def test_maximum_likelihood_and_flow_matching_training_reduce_their_losses() -> None:
    data = toy_dataset("moons", 2000, seed=0)
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=4, hidden=(32,))
    state = Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=300, lr=3e-3, log_every=1), data=data).fit()
    losses = [row["loss"] for row in state.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    matcher = FlowMatcher(VelocityMLP(2, hidden=(32, 32), time_embedding=8))
    state = Trainer(matcher, FlowMatchingObjective(), TrainerConfig(steps=300, lr=3e-3, log_every=1), data=data).fit()
    losses = [row["loss"] for row in state.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2


def test_reverse_kl_learns_the_banana() -> None:
    """KL(q || p) < 0.05 nats: below a tenth of the best Gaussian's (0.55, measured by the same training
    of a full-covariance Gaussian, below), and by Pinsker a total-variation distance under 0.16."""
    objective = ReverseKL("banana", samples=256)
    torch.manual_seed(0)
    gaussian = Flow(DiagNormal(2), LULinear(2))
    Trainer(gaussian, objective, TrainerConfig(steps=600, lr=1e-2)).fit()
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=6, hidden=(32, 32))
    Trainer(flow, objective, TrainerConfig(steps=800, lr=5e-3)).fit()
    torch.manual_seed(1)
    gaussian_kl, flow_kl = objective.kl(gaussian, 20_000), objective.kl(flow, 20_000)
    assert gaussian_kl > 0.3
    assert flow_kl < 0.05
    assert objective.kl(flow, 20_000) >= -0.01  # a KL estimate is never meaningfully negative
    assert target("banana").log_normalizer == 0.0


def test_named_targets_are_normalised_where_they_say_so() -> None:
    h = 0.02
    boxes = {"banana": ((-10, 10), (-8, 54)), "mixture": ((-6, 6), (-6, 6)), "ring": ((-6, 6), (-6, 6))}
    for name, ((x_low, x_high), (y_low, y_high)) in boxes.items():
        xs = torch.arange(x_low, x_high, h, dtype=torch.float64) + h / 2
        ys = torch.arange(y_low, y_high, h, dtype=torch.float64) + h / 2
        points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        t = target(name)
        mass = float(t(points).exp().sum()) * h * h
        assert mass == pytest.approx(math.exp(t.log_normalizer), rel=2e-3), name
    with pytest.raises(ValueError, match="unknown target"):
        target("nope")


def test_learning_rate_schedules() -> None:
    cosine = learning_rate_factor(TrainerConfig(steps=110, warmup_steps=10, schedule="cosine"))
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0)
    one_cycle = learning_rate_factor(TrainerConfig(steps=100, schedule="one-cycle"))
    values = [one_cycle(s) for s in range(100)]
    assert max(values) == pytest.approx(1.0, abs=1e-3) and values.index(max(values)) == 30
    assert values[0] < 0.05 and values[-1] < 0.01
    assert learning_rate_factor(TrainerConfig(steps=10, schedule="constant"))(7) == 1.0
    with pytest.raises(ConfigError, match=r"^warmup_steps = 5: the one-cycle schedule rises to the peak itself"):
        TrainerConfig(steps=20, warmup_steps=5, schedule="one-cycle")  # it would rise, fall to 0.04 and rise again


def test_the_logged_learning_rate_is_the_one_each_step_used() -> None:
    config = TrainerConfig(steps=10, batch_size=8, lr=1.0, warmup_steps=4, log_every=1, max_grad_norm=None)
    trainer = Trainer(RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), config, data=torch.randn(40, 2))
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"]))
    state = trainer.fit()
    factor = learning_rate_factor(config)
    assert used == pytest.approx([factor(s) for s in range(10)])  # 0.25, 0.5, 0.75, 1, 1, ..., 0.067
    assert [row["lr"] for row in state.history if "lr" in row] == pytest.approx(used)


def test_ema_weights_are_the_ones_kept() -> None:
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=2, hidden=(8,))
    trainer = Trainer(
        flow, MaximumLikelihood(), TrainerConfig(steps=30, batch_size=16, ema_decay=0.9), data=torch.randn(100, 2)
    )
    trainer.fit()
    for name, value in flow.state_dict().items():
        assert torch.equal(value, trainer.ema.shadow[name])


def test_early_stopping_restores_the_best_weights() -> None:
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=2, hidden=(8,))
    config = TrainerConfig(steps=1000, batch_size=16, eval_every=10, patience=3, lr=1e-2)
    trainer = Trainer(flow, _Worsening(), config, data=torch.randn(100, 2), validation_data=torch.randn(20, 2))
    state = trainer.fit()
    assert state.step == 40  # best at 10, then three validations without improvement
    for name, value in flow.state_dict().items():
        assert torch.equal(value, trainer.best_weights[name])


def test_bf16_autocast_trains_on_cpu() -> None:
    torch.manual_seed(0)
    matcher = FlowMatcher(VelocityMLP(2, hidden=(16,), time_embedding=8))
    state = Trainer(
        matcher,
        FlowMatchingObjective(),
        TrainerConfig(steps=20, batch_size=32, precision="bf16", log_every=5),
        data=torch.randn(200, 2),
    ).fit()
    assert all(math.isfinite(row["loss"]) for row in state.history if "loss" in row)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(schedule="linear")
    with pytest.raises(ValueError, match="patience needs eval_every"):
        TrainerConfig(patience=2)
    with pytest.raises(ValueError, match="fp16"):
        Trainer(RealNVP(2, transforms=2), MaximumLikelihood(), TrainerConfig(precision="fp16"), data=torch.randn(4, 2))
    with pytest.raises(ValueError, match="trains on data"):
        Trainer(RealNVP(2, transforms=2), MaximumLikelihood())

    class Exploding(Objective):
        needs_data = False

        def loss(self, model, batch):
            return sum(p.sum() for p in model.parameters()) * float("nan")

    with pytest.raises(FloatingPointError, match="step 0"):
        Trainer(RealNVP(2, transforms=2), Exploding(), TrainerConfig(steps=3)).fit()


NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("steps", 0),
    ("steps", 1.5),
    ("steps", True),
    ("batch_size", 0),
    ("batch_size", -8),
    ("lr", NAN),
    ("lr", 0.0),
    ("lr", -1e-3),
    ("lr", INF),
    ("lr", "1e-3"),
    ("weight_decay", -0.1),
    ("weight_decay", INF),
    ("warmup_steps", -1),
    ("warmup_steps", 2000),  # == steps: the schedule would never start
    ("warmup_steps", 2.0),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", NAN),
    ("ema_decay", 0.0),
    ("ema_decay", 1.0),
    ("ema_decay", 1.5),
    ("precision", "fp8"),
    ("schedule", "linear"),
    ("seed", -1),
    ("eval_every", -1),
    ("patience", 0),
    ("checkpoint_every", -5),
    ("log_every", 0),
    ("gradient_checkpointing", 1),
    ("tensorboard", "yes"),
    ("progress", 0),
]


@pytest.mark.parametrize(("key", "value"), BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v in BAD_SETTINGS])
def test_every_trainer_setting_is_range_checked(key: str, value: object) -> None:
    settings = {"eval_every": 5} if key == "patience" else {}
    with pytest.raises(ConfigError) as error:
        TrainerConfig(**settings, **{key: value})
    message = str(error.value)
    assert message.startswith(f"{key} = {value!r}"), message  # the key, then the value ...
    assert "expected" in message or "is not one of" in message, message  # ... then what is allowed


def test_fp16_is_refused_without_cuda_and_good_settings_pass() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^precision = 'fp16': .*use 'bf16' on a CPU"):
            TrainerConfig(precision="fp16")
    config = TrainerConfig(lr=1, max_grad_norm=None, ema_decay=0.5, warmup_steps=1999, patience=1, eval_every=1)
    assert isinstance(config.lr, float) and config.max_grad_norm is None
    with pytest.raises(ConfigError, match=r"^patience = 2: patience needs eval_every >= 1"):
        TrainerConfig(patience=2)


def test_data_with_fewer_rows_than_a_batch_is_repeated_to_fill_it() -> None:
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=2, hidden=(8,))
    trainer = Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=4, batch_size=32), data=torch.randn(10, 2))
    x, _ = trainer.batches.next()
    assert x.shape == (32, 2) and trainer.batches.steps_per_epoch == 1
    trainer.fit()
    with pytest.raises(ValueError, match="no rows"):
        Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=4, batch_size=32), data=torch.randn(0, 2))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    flow = RealNVP(3, transforms=6, hidden=(16,)).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    grads = {}
    for enabled in (False, True):
        Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=1, gradient_checkpointing=enabled), data=x)
        assert flow.transform.checkpointing is enabled
        flow.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        grads[enabled] = [p.grad.clone() for p in flow.parameters()]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_adversarial_training_moves_samples_to_the_data_and_checkpoints_the_discriminator(tmp_path: Path) -> None:
    from flowforge.eval import sliced_wasserstein
    from flowforge.train import AdversarialML

    data = toy_dataset("8gaussians", 4000, seed=0)
    torch.manual_seed(0)
    flow = RealNVP(2, transforms=4, hidden=(32,))

    def distance() -> float:
        with torch.no_grad():
            return sliced_wasserstein(flow.sample(1000), data[:1000], generator=torch.Generator().manual_seed(0))

    before = distance()
    objective = AdversarialML(features=2, ml_weight=0.0, adversarial_weight=1.0, hidden=(64, 64))
    config = TrainerConfig(steps=300, batch_size=128, lr=2e-3)
    Trainer(flow, objective, config, data=data, directory=tmp_path).fit()
    after = distance()
    assert after < 0.7 * before, (before, after)  # no likelihood term: the discriminator alone taught it (0.88 -> 0.49)
    resumed = AdversarialML(features=2, ml_weight=0.0, hidden=(64, 64))
    Trainer(RealNVP(2, transforms=4, hidden=(32,)), resumed, config, data=data, directory=tmp_path).load()
    for name, value in objective.discriminator.state_dict().items():
        assert torch.equal(resumed.discriminator.state_dict()[name], value), name
    with pytest.raises(ValueError, match="at least one weight must be > 0"):
        AdversarialML(features=2, ml_weight=0.0, adversarial_weight=0.0)


def test_adversarial_settings_are_refused_where_they_enter() -> None:
    from flowforge.train import AdversarialML

    refusals = {
        "ml_weight must be a finite number >= 0, got nan": {"ml_weight": float("nan")},
        "ml_weight must be a finite number >= 0, got -1": {"ml_weight": -1},
        "adversarial_weight must be a finite number >= 0, got inf": {"adversarial_weight": float("inf")},
        "lr must be a finite number > 0, got -1": {"lr": -1},
        "hidden must be a sequence of positive ints": {"hidden": (8.5,)},
        "features must be": {"features": 0},
    }
    for message, settings in refusals.items():
        with pytest.raises((ValueError, TypeError), match=message):
            AdversarialML(**{"features": 2, **settings})
    flow, config = RealNVP(2, transforms=2, hidden=(8,)), TrainerConfig(steps=2, batch_size=8, progress=False)
    trainer = Trainer(flow, AdversarialML(3, hidden=(8,)), config, data=torch.randn(64, 2))
    with pytest.raises(ValueError, match=r"AdversarialML\(features=3\) got data of shape \(8, 2\)"):
        trainer.fit()


def test_a_float64_flow_gan_run_resumes_exactly_and_refuses_another_objective(tmp_path: Path) -> None:
    """The discriminator takes the flow's dtype before its optimizer state loads (a float64 run
    could not resume); a checkpoint that does not fit the objective is refused before anything loads."""
    from flowforge.train import AdversarialML, TrainingInterrupted

    class InterruptedAt(AdversarialML):
        def __init__(self, at: int | None, hidden: tuple[int, ...] = (8,)) -> None:
            super().__init__(2, hidden=hidden)
            self.at, self.calls = at, 0

        def loss(self, model, batch):
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)
            return super().loss(model, batch)

    data = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    config = TrainerConfig(steps=10, batch_size=32, checkpoint_every=0, progress=False)

    def trainer(directory: Path, objective) -> Trainer:  # objective: built after the seed
        torch.manual_seed(3)
        flow = RealNVP(2, transforms=2, hidden=(8,)).double()
        return Trainer(flow, objective(), config, data=data, directory=directory)

    trainer(tmp_path / "straight", lambda: InterruptedAt(None)).fit()
    with pytest.raises(TrainingInterrupted):
        trainer(tmp_path / "stopped", lambda: InterruptedAt(5)).fit()
    refusals = {
        "the saved state of its InterruptedAt does not fit this one": lambda: InterruptedAt(None, hidden=(16,)),
        "trained with the objective InterruptedAt, not MaximumLikelihood": MaximumLikelihood,
    }
    for message, objective in refusals.items():
        refused = trainer(tmp_path / "stopped", objective)
        before = {k: v.clone() for k, v in refused.model.state_dict().items()}
        with pytest.raises(CheckpointError, match=message):
            refused.fit(resume=True)
        assert all(torch.equal(v, before[k]) for k, v in refused.model.state_dict().items())  # nothing loaded
    trainer(tmp_path / "stopped", lambda: AdversarialML(2, hidden=(8,))).fit(resume=True)  # the class it derives from
    expected = load_tensors(tmp_path / "straight", "model")
    for name, value in load_tensors(tmp_path / "stopped", "model").items():
        assert torch.equal(value, expected[name]), name


def test_data_the_trainer_cannot_read_is_refused_before_training() -> None:
    flow, config = RealNVP(2, transforms=2, hidden=(8,)), TrainerConfig(steps=20, batch_size=8, eval_every=10)
    with pytest.raises(ValueError, match="eval_every = 10: validation scores held-out data; pass validation_data"):
        Trainer(flow, MaximumLikelihood(), config, data=torch.randn(40, 2))
    with pytest.raises(TypeError, match="data must be a tensor, a dict of tensors or a torch Dataset, got list"):
        Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=2, batch_size=8), data=[[0.0, 1.0]] * 8)


def test_tensorboard_logging_writes_event_files(tmp_path: Path) -> None:
    flow = RealNVP(2, transforms=2, hidden=(8,))
    config = TrainerConfig(steps=6, batch_size=8, log_every=2, tensorboard=True, eval_every=3)
    Trainer(
        flow,
        MaximumLikelihood(),
        config,
        data=torch.randn(50, 2),
        validation_data=torch.randn(10, 2),
        directory=tmp_path,
    ).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("validation")] == [3, 6]


def test_trainer_flags_are_true_or_false() -> None:
    with pytest.raises(ConfigError, match=r"progress = 'x': expected true or false \(or none\)"):
        TrainerConfig(progress="x")
    with pytest.raises(ConfigError, match=r"warmup_steps = 5: expected an integer in \[0, 4\]"):
        TrainerConfig(steps=5, warmup_steps=5)


def test_the_moving_average_refuses_a_decay_outside_zero_to_one() -> None:
    from flowforge.train.state import ExponentialMovingAverage

    model = torch.nn.Linear(2, 2)
    for decay in (float("nan"), 0, 1, 1.5, "0.9"):
        with pytest.raises(ConfigError, match=r"decay = .*: expected a finite number > 0 and < 1"):
            ExponentialMovingAverage(model, decay)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        ExponentialMovingAverage("model", 0.9)
    average = ExponentialMovingAverage(model, 0.75)
    before = average.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update(model)
    torch.testing.assert_close(average.shadow["weight"], before + 4.0)  # the first update copies
    before = average.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.copy_(before + 4.0)
    average.update(model)
    torch.testing.assert_close(average.shadow["weight"], before + 1.0)  # a quarter of the way


def test_objectives_refuse_their_settings_where_they_are_built() -> None:
    from flowforge.train import PolicyDistillation, ReverseKL

    teacher = torch.nn.Linear(1, 1)
    for arguments, error, message in (
        ({"teacher": "runs/flow"}, TypeError, "teacher must be a trained flow ChunkPolicy, got str"),
        ({"teacher": teacher, "method": "bogus"}, ValueError, "unknown method 'bogus'; choose one of 'consistency'"),
        ({"teacher": teacher, "intervals": 0}, ValueError, "intervals must be a positive int, got 0"),
    ):
        with pytest.raises(error, match=message):
            PolicyDistillation(**arguments)
    with pytest.raises(ValueError, match="samples must be a positive int, got 0"):
        ReverseKL("banana", samples=0)
    with pytest.raises(TypeError, match="target must be a log-density callable or a built-in name, got int"):
        ReverseKL(5)


@pytest.mark.parametrize("ending", ["ema", "best"])
def test_a_run_killed_before_its_final_save_resumes_to_its_final_weights(tmp_path: Path, ending: str) -> None:
    # the periodic save of the last step holds the live weights; the final save swaps in the EMA or
    # the best validated ones: a kill between the two must not leave the live weights as the result
    data = toy_dataset("moons", 256, seed=0)
    settings = {"ema_decay": 0.9} if ending == "ema" else {"eval_every": 1, "lr": 0.3}
    config = TrainerConfig(steps=8, batch_size=16, checkpoint_every=4, progress=False, **settings)
    extra = {"validation_data": data[:64]} if ending == "best" else {}

    def trainer(directory: Path) -> Trainer:
        torch.manual_seed(0)
        return Trainer(
            RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), config, data=data, directory=directory, **extra
        )

    straight = trainer(tmp_path / "straight")
    straight.fit()
    killed = trainer(tmp_path / "killed")
    saves = []

    def save_then_die() -> None:
        saves.append(killed.state.step)
        if len(saves) == 3:  # step 4, step 8, then the final save: killed before it
            raise KeyboardInterrupt
        Trainer._checkpoint(killed)

    killed._checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = trainer(tmp_path / "killed")
    resumed.fit(resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    saved = load_tensors(tmp_path / "killed", "model")
    for name, value in load_tensors(tmp_path / "straight", "model").items():
        assert torch.equal(saved[name], value), name


def test_the_moving_average_follows_a_layer_initialised_from_the_first_batch() -> None:
    from flowforge.flows import ResidualFlow

    data = torch.randn(512, 2) * 3 + 10  # far from the origin: ActNorm's first-batch shift matters
    models = []
    for ema in (None, 0.99):
        torch.manual_seed(0)
        flow = ResidualFlow(2, transforms=1, hidden=(8,), logdet="exact")
        Trainer(
            flow, MaximumLikelihood(), TrainerConfig(steps=20, batch_size=64, ema_decay=ema, progress=False), data=data
        ).fit()
        models.append(flow)
    with torch.no_grad():
        plain, averaged = (float(-model.log_prob(data).mean()) for model in models)
    # averaging the first step with the initial weights kept ActNorm near its unfitted start: NLL 58 against 5
    assert averaged < plain + 1.0


def test_a_nan_gradient_of_a_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    class NanGradientAtStep20(MaximumLikelihood):
        calls = 0

        def loss(self, model, batch):
            loss = super().loss(model, batch)
            self.calls += 1
            if self.calls == 20:  # adds 0 to the loss, NaN to the gradient (0 * inf)
                weight = next(model.parameters())
                loss = loss + 0.0 * torch.sqrt(weight - weight.detach()).sum()
            return loss

    data = torch.randn(200, 2)
    for clip in (10.0, None):  # with clipping the step is refused, without it the checkpoint is
        folder = tmp_path / f"clip-{clip}"
        config = TrainerConfig(steps=100, batch_size=16, progress=False, checkpoint_every=10, max_grad_norm=clip)
        torch.manual_seed(0)
        with pytest.raises(FloatingPointError, match="gradient norm is nan at step 19" if clip else "weights hold"):
            Trainer(
                RealNVP(2, transforms=2, hidden=(8,)), NanGradientAtStep20(), config, data=data, directory=folder
            ).fit()
        manifest = read_manifest(folder, training=True)
        assert manifest["trainer"]["state"]["step"] == 10  # the last finite one, still resumable
        trainer = Trainer(
            RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), config, data=data, directory=folder
        )
        assert trainer.fit(resume=True).step == 100


def test_validation_that_fails_or_is_nan_leaves_the_live_weights_and_stops_the_run() -> None:
    class Failing(MaximumLikelihood):
        def validation(self, model, batch):
            raise RuntimeError("validation failed")

    class Diverged(MaximumLikelihood):
        def validation(self, model, batch):
            return float("nan")

    config = TrainerConfig(steps=20, batch_size=16, eval_every=10, ema_decay=0.9, progress=False)
    data, held_out = torch.randn(100, 2), torch.randn(20, 2)
    flow = RealNVP(2, transforms=2, hidden=(8,))
    trainer = Trainer(flow, Failing(), config, data=data, validation_data=held_out)
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit()
    assert flow.training
    assert any(not torch.equal(flow.state_dict()[k], v) for k, v in trainer.ema.shadow.items())
    with pytest.raises(FloatingPointError, match="validation is nan at step 10"):
        Trainer(flow, Diverged(), config, data=data, validation_data=held_out).fit()


def test_the_trainer_refuses_bad_objectives_data_and_settings_before_training(tmp_path: Path) -> None:
    flow, data = RealNVP(2, transforms=2, hidden=(8,)), torch.randn(100, 2)
    config = TrainerConfig(steps=5, batch_size=8, progress=False)
    with pytest.raises(TypeError, match="objective must be an Objective instance"):
        Trainer(flow, MaximumLikelihood, config, data=data)

    class PerRow(MaximumLikelihood):
        def loss(self, model, batch):
            return -model.log_prob(batch[0])

    with pytest.raises(TypeError, match=r"PerRow.loss returned a tensor of shape \(8,\): expected a scalar"):
        Trainer(flow, PerRow(), config, data=data).fit()
    bad = data.clone()
    bad[37, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data holds nan at index \(37, 1\)"):
        Trainer(flow, MaximumLikelihood(), config, data=bad, directory=tmp_path / "run")
    with pytest.raises(ValueError, match=r"validation_data holds nan"):
        Trainer(flow, MaximumLikelihood(), config, data=data, validation_data=bad)
    conditional = RealNVP(2, context=1, transforms=2, hidden=(8,))
    with pytest.raises(TypeError, match=r"context must be a floating-point tensor .* got torch\.int64"):
        Trainer(conditional, MaximumLikelihood(), config, data=data, context=torch.zeros(100, 1, dtype=torch.long))
    assert not (tmp_path / "run").exists()
    changed = TrainerConfig(steps=5, batch_size=8)
    changed.schedule = "linear"  # changed after it was checked
    with pytest.raises(ConfigError, match="schedule = 'linear'"):
        Trainer(flow, MaximumLikelihood(), changed, data=data)
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="schedule = 'Cosine': expected one of"):
        learning_rate_factor(SimpleNamespace(steps=10, warmup_steps=0, schedule="Cosine"))
    with pytest.raises(ValueError, match=r"warmup_steps = 20: expected an integer in \[0, steps\)"):
        learning_rate_factor(SimpleNamespace(steps=10, warmup_steps=20, schedule="cosine"))
    with pytest.raises(ConfigError, match=r"precision = 'bf16': .* this model is torch.float64"):
        Trainer(
            RealNVP(2, transforms=2, hidden=(8,)).double(),
            MaximumLikelihood(),
            TrainerConfig(batch_size=8, precision="bf16"),
            data=data.double(),
        )


def test_a_run_resumes_only_in_the_dtype_it_was_trained_in(tmp_path: Path) -> None:
    config = TrainerConfig(steps=20, batch_size=16, progress=False, checkpoint_every=5)
    data = torch.randn(100, 2, dtype=torch.float64)
    Trainer(
        RealNVP(2, transforms=2, hidden=(8,)).double(), MaximumLikelihood(), config, data=data, directory=tmp_path
    ).fit()
    with pytest.raises(CheckpointError, match="trained in float64, the model given is float32"):
        Trainer(RealNVP(2, transforms=2, hidden=(8,)), MaximumLikelihood(), config, data=data, directory=tmp_path).fit(
            resume=True
        )
