r"""One training loop for every model, with the objective as a pluggable piece.

Objectives (:class:`Objective`): :class:`MaximumLikelihood` (a flow's NLL),
:class:`FlowMatchingObjective` (a :class:`~flowforge.matching.FlowMatcher`'s regression loss) and
:class:`ReverseKL` (variational training of a flow against an unnormalized log-density
:math:`\log\tilde p`, with no data: :math:`\mathbb E_{x\sim q}[\log q(x) - \log\tilde p(x)]`) and
:class:`AdversarialML` (Flow-GAN: maximum likelihood mixed with a discriminator's loss).

The loop (:class:`Trainer`) adds what every run needs: Adam(W), a learning-rate schedule
(``constant``, ``cosine`` to zero, ``one-cycle``) after a linear warm-up, gradient-norm clipping,
an exponential moving average of the weights, bf16 autocast (fp16 with a gradient scaler on
CUDA), periodic validation with early stopping (the best weights are restored), a metrics CSV,
and checkpoints that hold everything needed to resume *exactly*: weights, optimizer, schedule,
EMA, the random-number states and the step. A run killed at any moment and restarted with
``resume=True`` ends with the same weights as an uninterrupted run.

**Data-parallel training.** Launched by ``torchrun`` (the process group joined with
:func:`init_distributed_from_environment`: gloo on CPU, nccl on GPU), every process draws the same
global minibatch indices and trains on its share; gradients are averaged over processes before
the optimizer step, so a run on P processes follows the single-process run with the same global
batch (for objectives without model noise exactly, up to floating-point summation order). Only
rank 0 writes checkpoints and metrics. A resumed multi-process run restores rank 0's random state
on every process.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowforge.checkpoint import (
    CheckpointError,
    decode_state,
    encode_state,
    load_state_dict_checked,
    load_tensors,
    read_manifest,
    save_checkpoint,
    write_atomic,
)
from flowforge.train.fit import progress_enabled
from flowforge.transforms.base import Compose

Batch = tuple[Tensor, Tensor | None]


def _rows(data: Tensor | dict[str, Tensor]) -> int:
    return next(iter(data.values())).shape[0] if isinstance(data, dict) else data.shape[0]


class Objective:
    """A training objective: ``loss(model, batch) -> scalar`` (``batch`` is ``(x, context)``, or ``None``
    for objectives that need no data), and ``validation(model, batch) -> float`` for early stopping."""

    needs_data = True

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def validation(self, model: nn.Module, batch: Batch | None) -> float:
        return float(self.loss(model, batch))


class MaximumLikelihood(Objective):
    """:math:`-\\frac1B \\sum_i \\log p_\\theta(x_i \\mid c_i)` for a :class:`~flowforge.flows.Flow`."""

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, context = batch
        return -model.log_prob(x, context).mean()


class FlowMatchingObjective(Objective):
    """The flow-matching regression loss of a :class:`~flowforge.matching.FlowMatcher` (or a shortcut model)."""

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, context = batch
        return model.loss(x, context)


class PolicyObjective(Objective):
    """A policy's own loss on a batch dict (``model.loss(batch)``): flow matching, regression or DDPM."""

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        data, _ = batch
        return model.loss(data)


class ReverseKL(Objective):
    r"""Reverse KL to an unnormalized target: :math:`\mathbb E_{x \sim q}[\log q(x) - \log \tilde p(x)]`.

    Equals :math:`\mathrm{KL}(q \| p) - \log Z`, so it is minimised by :math:`q = p` without
    knowing :math:`Z`. Needs ``model.sample_and_log_prob`` with reparametrised samples (every
    flowforge flow). ``validation`` returns the KL itself when the target's ``log_normalizer`` is known.

    Arguments:
        target: a callable ``log_density(x) -> (batch,)`` or a built-in name (``"banana"``, ...).
        samples: samples per step.
    """

    needs_data = False

    def __init__(self, target: Callable[[Tensor], Tensor] | str, samples: int = 256) -> None:
        if isinstance(target, str):
            from flowforge.data.targets import target as named_target

            target = named_target(target)
        self.target = target
        self.samples = int(samples)

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, log_q = model.sample_and_log_prob(self.samples)
        return (log_q - self.target(x)).mean()

    @torch.no_grad()
    def validation(self, model: nn.Module, batch: Batch | None) -> float:
        return self.kl(model, 4 * self.samples)

    @torch.no_grad()
    def kl(self, model: nn.Module, samples: int) -> float:
        """Monte-Carlo estimate of KL(q || p) (of the loss when the normaliser is unknown)."""
        x, log_q = model.sample_and_log_prob(samples)
        log_normalizer = getattr(self.target, "log_normalizer", None) or 0.0
        return float((log_q - self.target(x)).mean()) + log_normalizer


class AdversarialML(Objective):
    r"""Flow-GAN (Grover et al. 2018): maximum likelihood mixed with an adversarial loss.

    A discriminator :math:`D` (logits) is trained alongside the flow, one step per flow step, on
    :math:`\mathrm{softplus}(-D(x)) + \mathrm{softplus}(D(\tilde x))` (real :math:`x`, samples
    :math:`\tilde x`). The flow minimises

    .. math:: w_{ML}\,\mathrm{NLL}(x) + w_{adv}\,\mathrm{softplus}(-D(\tilde x)),

    the non-saturating generator loss, through reparametrised samples. ``ml_weight = 0`` is a
    pure GAN with an exact likelihood still available; the likelihood term keeps the flow from
    dropping modes. The discriminator and its optimizer are saved in training checkpoints.

    Arguments:
        features: data dimension (for the default discriminator, an MLP with ``hidden`` widths).
        discriminator: a module ``(batch, features) -> (batch, 1)`` logits, instead of the default.
        ml_weight, adversarial_weight: the two weights.
        lr: the discriminator's Adam learning rate.
    """

    def __init__(
        self,
        features: int | None = None,
        discriminator: nn.Module | None = None,
        ml_weight: float = 1.0,
        adversarial_weight: float = 1.0,
        lr: float = 1e-3,
        hidden: tuple[int, ...] = (64, 64),
    ) -> None:
        from flowforge.nn import MLP

        if discriminator is None:
            if features is None:
                raise ValueError("give features (for the default discriminator) or a discriminator")
            discriminator = MLP(features, 1, hidden, nn.LeakyReLU)
        if ml_weight < 0 or adversarial_weight < 0 or ml_weight + adversarial_weight == 0:
            raise ValueError("the weights must be >= 0 and not both 0")
        self.discriminator = discriminator
        self.ml_weight, self.adversarial_weight = float(ml_weight), float(adversarial_weight)
        self.optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, context = batch
        if context is not None:
            raise ValueError("AdversarialML trains unconditional flows")
        discriminator = self.discriminator.to(x.device, x.dtype)
        fake = model.rsample(x.shape[0])
        real_logits, fake_logits = discriminator(x), discriminator(fake.detach())
        d_loss = nn.functional.softplus(-real_logits).mean() + nn.functional.softplus(fake_logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        loss = self.adversarial_weight * nn.functional.softplus(-discriminator(fake)).mean()
        if self.ml_weight:
            loss = loss - self.ml_weight * model.log_prob(x).mean()
        return loss

    @torch.no_grad()
    def validation(self, model: nn.Module, batch: Batch | None) -> float:
        x, context = batch
        return float(-model.log_prob(x, context).mean())

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class TrainerConfig:
    """Settings of a training run (all JSON-serialisable, stored in every checkpoint).

    Arguments:
        steps: optimizer steps.
        batch_size: minibatch size (data objectives).
        lr: peak learning rate; weight_decay: AdamW decoupled weight decay (0: Adam).
        schedule: ``"constant"``, ``"cosine"`` (to 0 at the last step) or ``"one-cycle"``.
        warmup_steps: linear warm-up from 0 before the schedule.
        max_grad_norm: clip the global gradient norm (None: off).
        ema_decay: keep an exponential moving average of the weights (None: off); evaluation,
            the saved model and the returned model use it.
        precision: ``"fp32"``, ``"bf16"`` (autocast; CPU or CUDA) or ``"fp16"`` (CUDA, with a scaler).
        gradient_checkpointing: recompute each layer of every ``Compose`` stack in the backward
            pass instead of storing its activations (deep stacks on little memory).
        seed: seeds the minibatch order and the global RNGs at the start of the run.
        eval_every: validate every this many steps (0: never); patience: stop after this many
            validations without improvement (None: never), restoring the best weights.
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end).
        log_every: record the loss in the history every this many steps.
        tensorboard: also write the loss, learning rate and validation to TensorBoard event files
            in ``<directory>/tensorboard`` (needs the ``tensorboard`` package).
        progress: progress bar (None: on a terminal, off under CI).
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 10.0
    ema_decay: float | None = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0
    patience: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    tensorboard: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine", "one-cycle"):
            raise ValueError(f"schedule must be 'constant', 'cosine' or 'one-cycle', got {self.schedule!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.patience is not None and self.eval_every < 1:
            raise ValueError("patience needs eval_every >= 1 (validation is what early stopping watches)")


def learning_rate_factor(config: TrainerConfig) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step (warm-up, then the schedule)."""
    warmup, steps = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        # one-cycle: rise over the first 30 % to the peak, then cosine down to 1/1000 of it.
        if progress < 0.3:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * progress / 0.3))
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))

    return factor


class ExponentialMovingAverage:
    r"""Shadow weights :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` after every step
    (floating-point parameters and buffers; integer buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value, 1 - self.decay)
            else:
                self.shadow[name].copy_(value)


@dataclass
class TrainingState:
    step: int = 0
    best_validation: float = math.inf
    evaluations_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Trains ``model`` on ``objective``.

    Arguments:
        model: a Flow, FlowMatcher or any module the objective understands.
        objective: what to minimise.
        config: a :class:`TrainerConfig`.
        data: training points (N, ...) for data objectives, or a dict of tensors with N rows each
            (a policy's states, actions and masks: each batch is then that dict, indexed);
            context: (N, c) or None.
        validation_data, validation_context: held-out points for validation / early stopping.
        directory: where checkpoints and ``metrics.csv`` go (None: nothing is written).
        metadata: JSON kept in every checkpoint (what rebuilds the run: its config, data statistics).

    >>> import torch
    >>> from flowforge.flows import RealNVP
    >>> flow = RealNVP(2, transforms=2, hidden=(16,))
    >>> trainer = Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=20, batch_size=32), data=torch.randn(500, 2))
    >>> len(trainer.fit().history) > 0
    True
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainerConfig | None = None,
        *,
        data: Tensor | dict[str, Tensor] | None = None,
        context: Tensor | None = None,
        validation_data: Tensor | dict[str, Tensor] | None = None,
        validation_context: Tensor | None = None,
        directory: str | Path | None = None,
        metadata: dict | None = None,
    ) -> None:
        self.model, self.objective = model, objective
        self.metadata = metadata or {}
        self.config = config if config is not None else TrainerConfig()
        if objective.needs_data and data is None:
            raise ValueError(f"{type(objective).__name__} trains on data: pass data=")
        if data is not None and context is not None and context.shape[0] != _rows(data):
            raise ValueError(f"context must have one row per data point: {context.shape[0]} != {_rows(data)}")
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise ValueError("the model has no parameters to train")
        self.device, self.dtype = parameter.device, parameter.dtype
        self.data = None if data is None else self._to_device(data)
        self.context = None if context is None else context.to(self.device, self.dtype)
        self.validation_batch = (
            None
            if validation_data is None
            else (
                self._to_device(validation_data),
                None if validation_context is None else validation_context.to(self.device, self.dtype),
            )
        )
        if self.config.patience is not None and self.validation_batch is None and objective.needs_data:
            raise ValueError("early stopping (patience) needs validation_data")
        self.directory = None if directory is None else Path(directory)
        cfg = self.config
        optimizer_class = torch.optim.AdamW if cfg.weight_decay else torch.optim.Adam
        self.optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, learning_rate_factor(cfg))
        self.ema = ExponentialMovingAverage(model, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and self.device.type == "cuda" else None
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' on a CPU")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        for module in model.modules():
            if isinstance(module, Compose):
                module.checkpointing = cfg.gradient_checkpointing
        self.world, self.rank = distributed_world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {self.world} processes")
        self.state = TrainingState()
        self.best_weights: dict[str, Tensor] | None = None

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> TrainingState:
        """Train to ``config.steps`` (or an early stop); ``resume=True`` continues from ``directory``'s checkpoint."""
        cfg = self.config
        if resume:
            if self.directory is None:
                raise ValueError("resume=True needs a directory to resume from")
            if (self.directory / "checkpoint.json").exists():
                self.load()
        if self.state.step == 0:
            # Each process draws its own model noise (flow-matching times, reverse-KL samples);
            # the minibatch indices come from self.generator, identical on every process.
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed((cfg.seed + self.rank) % 2**32)
        if self.world > 1:
            self._broadcast_weights()
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            desc="train",
            disable=self.rank != 0 or not progress_enabled(cfg.progress),
            leave=False,
        )
        stopped_early = False
        self.writer = self._tensorboard_writer()
        while self.state.step < cfg.steps and not stopped_early:
            loss_tensor = self._step()
            self.state.step += 1
            step = self.state.step
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = float(loss_tensor)  # read back only when logged: no device sync on other steps
                self.state.history.append({"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]})
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("loss", loss, step)
                    self.writer.add_scalar("lr", self.scheduler.get_last_lr()[0], step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                stopped_early = self._validate()
            if (
                cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and self.directory is not None
                and self.rank == 0
            ):
                self.save()
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        elif self.ema is not None:
            self.model.load_state_dict(self.ema.shadow)
        self.model.eval()
        if self.directory is not None and self.rank == 0:
            self.save()
            self._write_metrics()
        if self.world > 1:
            torch.distributed.barrier()  # the checkpoint is complete before any process moves on
        return self.state

    def _to_device(self, data: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Floating tensors take the model's dtype; integer and boolean ones (masks, uint8 images) keep theirs."""
        if isinstance(data, dict):
            rows = {_rows(v) for v in data.values()}
            if len(rows) != 1:
                raise ValueError(f"every tensor of a data dict needs the same number of rows, got {sorted(rows)}")
            return {k: self._to_device(v) for k, v in data.items()}
        return data.to(self.device, self.dtype) if data.is_floating_point() else data.to(self.device)

    def _batch(self) -> Batch | None:
        if self.data is None:
            return None
        index = torch.randint(0, _rows(self.data), (self.config.batch_size,), generator=self.generator)
        if self.world > 1:  # every process draws the global batch and keeps its share
            share = self.config.batch_size // self.world
            index = index[self.rank * share : (self.rank + 1) * share]
        index = index.to(self.device)
        data = {k: v[index] for k, v in self.data.items()} if isinstance(self.data, dict) else self.data[index]
        return data, None if self.context is None else self.context[index]

    def _step(self) -> Tensor:
        cfg = self.config
        batch = self._batch()
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = self.objective.loss(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.state.step} (lr={self.scheduler.get_last_lr()[0]:.2e}); "
                "lower the learning rate, clip gradients or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.world > 1:
            self._average_gradients()
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= self.world
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    writer = None

    def _tensorboard_writer(self):
        if not self.config.tensorboard or self.directory is None or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
        return SummaryWriter(str(self.directory / "tensorboard"))

    def _average_gradients(self) -> None:
        """Average the gradients over all processes (what DDP does), in one flat all-reduce.

        Done explicitly rather than by wrapping the model in ``DistributedDataParallel``: flows and
        matchers are trained through ``log_prob`` / ``loss``, not ``forward``, which DDP's hooks
        would not see.
        """
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _broadcast_weights(self) -> None:
        """Start every process from rank 0's weights and buffers."""
        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _validate(self) -> bool:
        """Validate (with the EMA weights when kept); returns True when early stopping triggers."""
        live = None
        if self.ema is not None:
            live = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.ema.shadow)
        self.model.eval()
        rng = torch.get_rng_state()  # validation must not shift the training noise
        value = self.objective.validation(self.model, self.validation_batch)
        torch.set_rng_state(rng)
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        if live is not None:
            self.model.load_state_dict(live)
        self.model.train()
        self.state.history.append({"step": self.state.step, "validation": value})
        if self.writer is not None:
            self.writer.add_scalar("validation", value, self.state.step)
        if value < self.state.best_validation:
            self.state.best_validation = value
            self.state.evaluations_without_improvement = 0
            self.best_weights = current
        else:
            self.state.evaluations_without_improvement += 1
        patience = self.config.patience
        return patience is not None and self.state.evaluations_without_improvement >= patience

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write a resumable checkpoint to ``directory`` (atomically; see :mod:`flowforge.checkpoint`)."""
        if self.directory is None:
            raise ValueError("this trainer has no directory to save to")
        tensors: dict[str, Tensor] = {}
        trainer_state = {
            "optimizer": encode_state(self.optimizer.state_dict(), tensors, "optimizer."),
            "scheduler": encode_state(self.scheduler.state_dict(), tensors, "scheduler."),
            "scaler": encode_state(self.scaler.state_dict(), tensors, "scaler.") if self.scaler else None,
            "torch_rng": encode_state(torch.get_rng_state(), tensors, "rng."),
            "generator": encode_state(self.generator.get_state(), tensors, "rng."),
            "python_rng": encode_state(_python_rng_state(), tensors, "rng."),
            "numpy_rng": encode_state(_numpy_rng_state(), tensors, "rng."),
            "state": asdict(self.state),
            "objective": encode_state(self.objective.state_dict(), tensors, "objective.")
            if hasattr(self.objective, "state_dict")
            else None,
        }
        groups = {"model": self.model.state_dict(), "trainer": tensors}
        if self.ema is not None:
            groups["ema"] = self.ema.shadow
        if self.best_weights is not None:
            groups["best"] = self.best_weights
        parameter = next(self.model.parameters())
        manifest: dict[str, Any] = {
            "class": type(self.model).__name__,
            "config": getattr(self.model, "config", None),
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "trainer_config": asdict(self.config),
            "trainer": trainer_state,
            "metadata": self.metadata,
        }
        return save_checkpoint(self.directory, groups, manifest)

    def load(self) -> None:
        """Restore the model, optimizer, schedule, EMA, RNG states and step from ``directory``."""
        manifest = read_manifest(self.directory)
        if "trainer" not in manifest:
            raise CheckpointError(f"{self.directory} holds weights only, not a resumable training state")
        saved = {k: v for k, v in manifest["trainer_config"].items() if k != "progress"}
        current = {k: v for k, v in asdict(self.config).items() if k != "progress"}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise CheckpointError(f"cannot resume {self.directory}: the trainer config differs in {', '.join(changed)}")
        load_state_dict_checked(self.model, load_tensors(self.directory, "model", manifest), self.directory)
        tensors = load_tensors(self.directory, "trainer", manifest)
        state = manifest["trainer"]
        self.optimizer.load_state_dict(decode_state(state["optimizer"], tensors))
        self.scheduler.load_state_dict(decode_state(state["scheduler"], tensors))
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(decode_state(state["scaler"], tensors))
        torch.set_rng_state(decode_state(state["torch_rng"], tensors))
        self.generator.set_state(decode_state(state["generator"], tensors))
        random.setstate(_python_rng_from(decode_state(state["python_rng"], tensors)))
        np.random.set_state(_numpy_rng_from(decode_state(state["numpy_rng"], tensors)))
        self.state = TrainingState(**state["state"])
        if state.get("objective") is not None:
            self.objective.load_state_dict(decode_state(state["objective"], tensors))
        if self.ema is not None:
            self.ema.shadow = load_tensors(self.directory, "ema", manifest)
        if "best" in manifest["files"]:
            self.best_weights = load_tensors(self.directory, "best", manifest)

    def _write_metrics(self) -> None:
        keys = ["step", "loss", "lr", "validation"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        for row in self.state.history:
            writer.writerow({k: row.get(k, "") for k in keys})
        write_atomic(self.directory / "metrics.csv", buffer.getvalue().encode())


def distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the torch.distributed process group, ``(1, 0)`` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def init_distributed_from_environment() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU).

    Does nothing outside ``torchrun`` (no ``WORLD_SIZE``) or when a group already exists.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return distributed_world()


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from(value: list) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _numpy_rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_rng_from(value: dict) -> tuple:
    keys = value["keys"].numpy().astype(np.uint32)
    return value["name"], keys, value["position"], value["has_gauss"], value["cached"]


__all__ = [
    "AdversarialML",
    "ExponentialMovingAverage",
    "FlowMatchingObjective",
    "MaximumLikelihood",
    "Objective",
    "ReverseKL",
    "Trainer",
    "TrainerConfig",
    "TrainingState",
    "distributed_world",
    "init_distributed_from_environment",
    "learning_rate_factor",
]
