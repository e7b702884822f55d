r"""One training loop for every model, with the objective as a pluggable piece.

:class:`Trainer` minimises an :class:`~flowforge.train.Objective` (:mod:`flowforge.train.objectives`)
and adds what every run needs: Adam(W), a learning-rate schedule (``constant``, ``cosine`` towards
zero, ``one-cycle``, :mod:`flowforge.train.schedules`) after a linear warm-up, gradient-norm
clipping, an exponential moving average of the weights, bf16 autocast (fp16 with a gradient
scaler on CUDA), periodic validation with early stopping (the best weights are restored), a
metrics CSV, and checkpoints that hold everything needed to resume *exactly*
(:mod:`flowforge.train.state`): a run killed at any moment and restarted with ``resume=True`` ends
with the same weights as an uninterrupted run.

**Data.** In-memory rows (a tensor, or a dict of tensors such as a policy's episode tensors) reach
the loop through a :class:`torch.utils.data.DataLoader` with a
:class:`~torch.utils.data.DistributedSampler` (:class:`~flowforge.train.distributed.ShardedBatches`):
each epoch is a fresh shuffle seeded by ``seed + epoch`` cut into full batches, so the batch of a
step is a function of the seed and the step alone.

**Data-parallel training.** Launched by ``torchrun`` (the process group joined with
:func:`~flowforge.train.init_distributed_from_environment`: gloo on CPU, nccl on GPU), the loss
runs inside :class:`torch.nn.parallel.DistributedDataParallel` (:mod:`flowforge.train.distributed`):
rank 0's weights are broadcast when training starts, each process trains on ``batch_size / P``
rows of the global batch, and the backward pass averages the gradients over the processes. The
union of the processes' rows at a step is the single-process batch of that step, so a run on
:math:`P` processes follows the single-process run with the same global batch (for objectives
without model noise exactly, up to floating-point summation order; the
:class:`~flowforge.transforms.BatchNorm` flow layer uses statistics of the global batch). Each
process draws its own model noise (seeded ``seed + rank``). Only rank 0 writes checkpoints and
metrics; the checkpoint keeps every process's random state, restored on resume.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import random
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowforge.checkpoint import write_atomic
from flowforge.config import check_choice, check_flag, check_integer, check_range, check_seed, plain_numbers
from flowforge.errors import ConfigError
from flowforge.train.distributed import (
    ShardedBatches,
    data_parallel,
    distributed_world,
    from_rank_zero,
    gather_to_rank_zero,
    mean_over_processes,
    rows_of,
)
from flowforge.train.objectives import Batch, Objective
from flowforge.train.schedules import SCHEDULES, learning_rate_factor
from flowforge.train.state import (
    ExponentialMovingAverage,
    TrainingParts,
    TrainingState,
    check_resumable,
    load_training_state,
    rng_state,
    save_training_state,
)
from flowforge.transforms.base import Compose
from flowforge.transforms.normalization import ActNorm, BatchNorm
from flowforge.utils.progress import progress_bar
from flowforge.validation import MAX_BATCH_SIZE

PRECISIONS = ("fp32", "bf16", "fp16")


def _refuse_non_finite(name: str, data: Any) -> None:
    """Refuse training or validation tensors holding NaN or inf before any step runs or anything is
    written (a data set read per batch is checked by its objective as it is read)."""
    tensors = data.items() if isinstance(data, dict) else [(None, data)]
    for key, tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = tuple(int(i) for i in (~torch.isfinite(tensor)).nonzero()[0])
            label = name if key is None else f"{name}[{key!r}]"
            raise ValueError(f"{label} holds {tensor[where].item()} at index {where}; expected finite numbers")


def check_batch_statistics(model: nn.Module, batch_size: int) -> None:
    """Refuse batches of one for a model whose ActNorm or BatchNorm layers estimate statistics from each batch."""
    layers = [type(m).__name__ for m in model.modules() if isinstance(m, ActNorm | BatchNorm)]
    if layers and batch_size < 2:
        raise ValueError(
            f"batch_size = {batch_size}: the model's {layers[0]} layers estimate statistics from each training "
            "batch, which needs at least 2 rows"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) after the step in progress, its checkpoint saved."""

    def __init__(self, step: int, directory: Path | None) -> None:
        where = f"the checkpoint in {directory} holds it; continue with --resume" if directory else "nothing saved"
        super().__init__(f"training stopped at step {step}: {where}")
        self.step, self.directory = step, directory


class _DeferredInterrupt:
    """Holds a Ctrl-C until the training step in progress ends, so that the checkpoint then saved is
    whole; a second Ctrl-C stops at once. Only in the main thread of a single process (the processes
    of a data-parallel run would stop at different steps)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainerConfig:
    """Settings of a training run (all JSON-serialisable, stored in every checkpoint).

    Arguments:
        steps: optimizer steps, >= 1.
        batch_size: global minibatch size (data objectives), >= 1; under ``torchrun`` a multiple of
            the number of processes, each of which trains on ``batch_size / P`` rows.
        lr: peak learning rate, finite and > 0; weight_decay: AdamW decoupled weight decay, finite
            and >= 0 (0: Adam).
        schedule: ``"constant"``, ``"cosine"`` (towards 0, which it reaches one step after the last)
            or ``"one-cycle"``.
        warmup_steps: linear warm-up from 0 before the schedule, in ``[0, steps)``; 0 with
            ``"one-cycle"``, which warms up itself.
        max_grad_norm: clip the global gradient norm to this finite value > 0 (None: off).
        ema_decay: keep an exponential moving average of the weights with this decay in (0, 1)
            (None: off); evaluation, the saved model and the returned model use it.
        precision: ``"fp32"``, ``"bf16"`` (autocast; CPU or CUDA) or ``"fp16"`` (CUDA only, with a
            gradient scaler; refused on a machine without CUDA).
        gradient_checkpointing: recompute each layer of every ``Compose`` stack in the backward
            pass instead of storing its activations (deep stacks on little memory).
        seed: >= 0; seeds the data order and the global RNGs at the start of the run.
        eval_every: validate every this many steps (0: never); a run that validates ends with its
            best validated weights (the moving average's when kept), early stopping or not; a NaN
            or inf validation stops it with a ``FloatingPointError``. patience: stop after this many
            validations without improvement, >= 1 (None: never).
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end),
            so that a killed run loses at most that many; a run stopped with Ctrl-C saves one after
            the step in progress either way.
        log_every: record the loss in the history every this many steps, >= 1.
        tensorboard: also write the loss, learning rate and validation to TensorBoard event files
            in ``<directory>/tensorboard`` (needs the ``tensorboard`` package).
        progress: progress bar (None: on a terminal, off under CI).

    Every setting is checked when the config is built; a bad one raises a
    :class:`~flowforge.errors.ConfigError` whose message starts with the key and the value:

    >>> TrainerConfig(lr=float("nan"))
    Traceback (most recent call last):
        ...
    flowforge.errors.ConfigError: lr = nan: expected a finite number > 0
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
    checkpoint_every: int = 500
    log_every: int = 10
    tensorboard: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_integer("steps", self.steps, low=1)
        check_integer("batch_size", self.batch_size, low=1, high=MAX_BATCH_SIZE, note=" (2**24)")
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_integer("warmup_steps", self.warmup_steps, low=0, high=self.steps - 1, note=" (fewer than steps)")
        if self.schedule == "one-cycle" and self.warmup_steps:
            raise ConfigError(
                f"warmup_steps = {self.warmup_steps}: the one-cycle schedule rises to the peak itself (over its "
                "first 30 % of steps), so a warm-up before it would rise twice; leave warmup_steps at 0, or pick "
                "'cosine' or 'constant'"
            )
        check_range("max_grad_norm", self.max_grad_norm, low=0, low_open=True, optional=True)
        check_range("ema_decay", self.ema_decay, low=0, high=1, low_open=True, high_open=True, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(
                "precision = 'fp16': needs CUDA (a gradient scaler on a GPU) and torch.cuda.is_available() "
                "is False; use 'bf16' on a CPU"
            )
        check_flag("gradient_checkpointing", self.gradient_checkpointing)
        check_seed("seed", self.seed)
        check_integer("eval_every", self.eval_every, low=0)
        if self.patience is not None:
            check_integer("patience", self.patience, low=1)
            if self.eval_every < 1:
                raise ConfigError(
                    f"patience = {self.patience!r}: patience needs eval_every >= 1 (validation is what early "
                    f"stopping watches), got eval_every = {self.eval_every}"
                )
        check_integer("checkpoint_every", self.checkpoint_every, low=0)
        check_integer("log_every", self.log_every, low=1)
        check_flag("tensorboard", self.tensorboard)
        check_flag("progress", self.progress, optional=True)
        # Numbers as floats, so that the config reads back from JSON unchanged (resume compares it).
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
        if self.max_grad_norm is not None:
            self.max_grad_norm = float(self.max_grad_norm)
        if self.ema_decay is not None:
            self.ema_decay = float(self.ema_decay)


class Trainer:
    """Trains ``model`` on ``objective``.

    Arguments:
        model: a Flow, FlowMatcher or any module the objective understands.
        objective: what to minimise.
        config: a :class:`TrainerConfig`.
        data: training points (N, ...) for data objectives, or a dict of tensors with N rows each
            (a policy's states, actions and masks: each batch is then that dict, indexed), or a
            :class:`~torch.utils.data.Dataset` whose ``__getitems__(indices)`` returns a whole batch
            ``(x, context)`` (data read from disk per batch); context: (N, c) or None. Data with
            fewer rows than ``batch_size`` is repeated to fill a batch (see
            :class:`~flowforge.train.distributed.ShardedBatches`).
        validation_data, validation_context: held-out points for validation / early stopping.
        directory: where checkpoints and ``metrics.csv`` go (None: nothing is written).
        metadata: JSON kept in every checkpoint (what rebuilds the run: its config, data statistics).
        workers: DataLoader worker processes that prepare batches of a ``Dataset`` (0: none).

    >>> import torch
    >>> from flowforge.flows import RealNVP
    >>> from flowforge.train import MaximumLikelihood
    >>> flow = RealNVP(2, transforms=2, hidden=(16,))
    >>> trainer = Trainer(flow, MaximumLikelihood(), TrainerConfig(steps=20, batch_size=32), data=torch.randn(500, 2))
    >>> len(trainer.fit().history) > 0
    True
    """

    #: Under torchrun: let DDP find parameters a step's loss does not reach (a model whose loss
    #: skips some parameters on some steps needs it; it costs about 10 % of a small model's step, see
    #: :mod:`flowforge.train.distributed`). Set it on the trainer before :meth:`fit`.
    find_unused_parameters: bool = False

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainerConfig | None = None,
        *,
        data: Tensor | dict[str, Tensor] | Dataset | None = None,
        context: Tensor | None = None,
        validation_data: Tensor | dict[str, Tensor] | None = None,
        validation_context: Tensor | None = None,
        directory: str | Path | None = None,
        metadata: dict | None = None,
        workers: int = 0,
    ) -> None:
        self.model, self.objective = model, objective
        self.metadata = metadata or {}
        cfg = config if config is not None else TrainerConfig()
        if not isinstance(cfg, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(cfg).__name__}")
        if isinstance(objective, type) or not callable(getattr(objective, "loss", None)):
            raise TypeError(
                "objective must be an Objective instance (MaximumLikelihood(), say) or an object with "
                f"loss(model, batch), got {objective!r}"
            )
        # A copy, checked again: a field changed after the config was built passes no check otherwise.
        self.config = cfg = dataclasses.replace(cfg)
        if objective.needs_data and data is None:
            raise ValueError(f"{type(objective).__name__} trains on data: pass data=")
        if objective.needs_data:
            check_batch_statistics(model, cfg.batch_size)
        if data is not None and context is not None and context.shape[0] != rows_of(data):
            raise ValueError(f"context must have one row per data point: {context.shape[0]} != {rows_of(data)}")
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise ValueError("the model has no parameters to train")
        self.device, self.dtype = parameter.device, parameter.dtype
        if cfg.precision == "bf16" and self.dtype != torch.float32:
            raise ConfigError(
                f"precision = 'bf16': autocast lowers float32 arithmetic only, and this model is {self.dtype}; "
                "use precision = 'fp32' (or a float32 model)"
            )
        # Before any checkpoint is loaded: an objective's own modules and optimizer state (Flow-GAN's
        # discriminator) must already have the model's device and dtype when their state loads.
        if hasattr(objective, "to"):
            objective.to(self.device, self.dtype)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision = 'fp16': needs the model on a CUDA device; use 'bf16' on a CPU")
        self.world, self.rank = distributed_world()
        if cfg.batch_size % self.world:
            raise ConfigError(
                f"batch_size = {cfg.batch_size}: expected a multiple of the number of processes ({self.world})"
            )
        for name, given in (("context", context), ("validation_context", validation_context)):
            if given is not None and not (isinstance(given, Tensor) and given.is_floating_point()):
                shown = given.dtype if isinstance(given, Tensor) else type(given).__name__
                raise TypeError(
                    f"{name} must be a floating-point tensor of context vectors, got {shown} "
                    "(class labels: one-hot them)"
                )
            _refuse_non_finite(name, given)
        _refuse_non_finite("data", data)
        _refuse_non_finite("validation_data", validation_data)
        self.data = None if data is None else self._to_device(data)
        self.context = None if context is None else context.to(self.device, self.dtype)
        self.batches = (
            None
            if self.data is None
            else ShardedBatches(
                self.data,
                self.context,
                cfg.batch_size,
                world=self.world,
                rank=self.rank,
                seed=cfg.seed,
                workers=workers,
            )
        )
        self.validation_batch: Batch | None = (
            None
            if validation_data is None
            else (
                self._to_device(validation_data),
                None if validation_context is None else validation_context.to(self.device, self.dtype),
            )
        )
        if cfg.patience is not None and self.validation_batch is None and objective.needs_data:
            raise ValueError("early stopping (patience) needs validation_data")
        if cfg.eval_every and self.validation_batch is None and objective.needs_data:
            raise ValueError(
                f"eval_every = {cfg.eval_every}: validation scores held-out data; pass validation_data, "
                "or leave eval_every at 0"
            )
        self.directory = None if directory is None else Path(directory)
        optimizer_class = torch.optim.AdamW if cfg.weight_decay else torch.optim.Adam
        self.optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, learning_rate_factor(cfg))
        self.ema = ExponentialMovingAverage(model, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        for module in model.modules():
            if isinstance(module, Compose):
                module.checkpointing = cfg.gradient_checkpointing
        self.state = TrainingState()
        self.best_weights: dict[str, Tensor] | None = None
        self.parallel: nn.Module | None = None  # the DistributedDataParallel wrapper, made by fit()

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> TrainingState:
        """Train to ``config.steps`` (or an early stop); ``resume=True`` continues from ``directory``'s checkpoint."""
        cfg = self.config
        if resume:
            if self.directory is None:
                raise ValueError("resume=True needs a directory to resume from")
            if (self.directory / "checkpoint.json").exists():
                self.load()
                if self.state.step >= cfg.steps or self._patience_ran_out():
                    # A finished run (its steps done, or stopped early). Its last checkpoint holds the
                    # final weights (the best, or the moving average) unless the process died between
                    # the periodic save of the last step and the final one: then finish it here.
                    if self._use_final_weights() and self.directory is not None:
                        self._checkpoint()
                        if self.rank == 0:
                            self._write_metrics()
                        if self.world > 1:
                            torch.distributed.barrier()
                    self.model.eval()
                    return self.state
        if self.state.step == 0:
            # Each process draws its own model noise (flow-matching times, reverse-KL samples); the
            # data order comes from the sampler, a function of the seed and the step alone.
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed((cfg.seed + self.rank) % 2**32)
        if self.world > 1 and self.parallel is None:
            # Wrapping broadcasts rank 0's weights and buffers: every process starts from them.
            self.parallel = data_parallel(
                self.model, self.objective, find_unused_parameters=self.find_unused_parameters
            )
        if self.batches is not None:
            self.batches.seek(self.state.step)
        self.model.train()
        bar = progress_bar(cfg.steps, "train", cfg.progress if self.rank == 0 else False, initial=self.state.step)
        stopped_early = False
        self.writer = self._tensorboard_writer()
        with _DeferredInterrupt(self.world == 1) as interrupt:
            while self.state.step < cfg.steps and not stopped_early:
                self._train_one_step(bar)
                stopped_early = self._after_step()
                if interrupt.requested and not stopped_early and self.state.step < cfg.steps:
                    bar.close()
                    if self.writer is not None:
                        self.writer.close()
                    saved = self.directory is not None
                    if saved:
                        self._checkpoint()
                    raise TrainingInterrupted(self.state.step, self.directory if saved else None)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        self._use_final_weights()
        self.model.eval()
        if self.directory is not None:
            self._checkpoint()
            if self.rank == 0:
                self._write_metrics()
        if self.world > 1:
            torch.distributed.barrier()  # the checkpoint is complete before any process moves on
        return self.state

    def _train_one_step(self, bar: Any) -> None:
        """One optimizer step, counted, logged every ``log_every`` steps."""
        cfg = self.config
        loss_tensor = self._step()
        self.state.step += 1
        step = self.state.step
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss = float(loss_tensor)  # read back only when logged: no device sync on other steps
            self.state.history.append({"step": step, "loss": loss, "lr": self.step_lr})
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, step)
                self.writer.add_scalar("lr", self.step_lr, step)

    def _after_step(self) -> bool:
        """Validation and the periodic checkpoint after a step; whether early stopping ends the run."""
        cfg, step = self.config, self.state.step
        stopped_early = bool(cfg.eval_every and step % cfg.eval_every == 0 and self._validate())
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and self.directory is not None:
            self._checkpoint()
        return stopped_early

    def _to_device(self, data: Tensor | dict[str, Tensor] | Dataset) -> Tensor | dict[str, Tensor] | Dataset:
        """Floating tensors take the model's dtype; integer and boolean ones (masks, uint8 images) keep theirs.
        A data set's batches are moved one at a time (:meth:`_step`)."""
        if isinstance(data, Dataset):
            return data
        if isinstance(data, dict):
            rows_of(data)  # refuses tensors with different numbers of rows
            return {k: self._to_device(v) for k, v in data.items()}
        if not isinstance(data, Tensor):
            raise TypeError(f"data must be a tensor, a dict of tensors or a torch Dataset, got {type(data).__name__}")
        return data.to(self.device, self.dtype) if data.is_floating_point() else data.to(self.device)

    def _loss(self, batch: Batch | None) -> Tensor:
        """This process's loss; through DDP's forward under torchrun, so its backward averages the gradients."""
        if self.parallel is None:
            return self.objective.loss(self.model, batch)
        try:
            return self.parallel(batch)
        except RuntimeError as error:
            if "find_unused_parameters" not in str(error):
                raise
            raise RuntimeError(
                f"the loss of step {self.state.step - 1} did not reach every trainable parameter of the "
                f"{type(self.model).__name__}, so DistributedDataParallel could not average all gradients; set "
                "trainer.find_unused_parameters = True before fit() (about 10 % slower steps), freeze the unused "
                "parameters (requires_grad=False), or make the loss use them"
            ) from error

    def _step(self) -> Tensor:
        cfg = self.config
        batch = self.batches.next() if self.batches is not None else None
        if isinstance(self.data, Dataset):  # read on the host: to the model's device and dtype
            x, context = batch
            batch = (self._to_device(x), None if context is None else context.to(self.device, self.dtype))
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = self._loss(batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
            shown = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            graph = "" if not isinstance(loss, Tensor) or loss.requires_grad else " that does not reach the model"
            raise TypeError(
                f"{type(self.objective).__name__}.loss returned {shown}{graph}: expected a scalar tensor "
                "computed from the model's parameters"
            )
        # The mean over processes is what is logged, and what every process checks: all of them stop together.
        logged = mean_over_processes(loss.detach(), self.world)
        if not torch.isfinite(logged):
            raise FloatingPointError(
                f"loss is {logged.item()} at step {self.state.step} (lr={self.scheduler.get_last_lr()[0]:.2e}); "
                "lower the learning rate, clip gradients or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            # A finite loss can have NaN gradients (0 * inf); fp16's scaler skips such steps itself.
            if self.scaler is None and not torch.isfinite(norm):
                raise FloatingPointError(
                    f"the gradient norm is {norm.item()} at step {self.state.step} with a finite loss "
                    f"({logged.item():.4g}); the weights were left as they were: check the loss for operations "
                    "without a finite derivative (sqrt or log at 0) or lower the learning rate"
                )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used (the scheduler moves on)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return logged

    writer = None

    def _tensorboard_writer(self):
        if not self.config.tensorboard or self.directory is None or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
        return SummaryWriter(str(self.directory / "tensorboard"))

    def _validate(self) -> bool:
        """Validate (with the EMA weights when kept); returns True when early stopping triggers."""
        live = None
        rng = torch.get_rng_state()  # validation must not shift the training noise
        if self.ema is not None:
            live = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.ema.shadow)
        self.model.eval()
        try:  # an error (or Ctrl-C) in validation must not leave the model on the EMA weights
            value = self.objective.validation(self.model, self.validation_batch)
            value = from_rank_zero(value, self.world)  # a noisy validation must not stop one process alone
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
        finally:
            torch.set_rng_state(rng)
            if live is not None:
                self.model.load_state_dict(live)
            self.model.train()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"validation is {value} at step {self.state.step}: the model diverged on held-out data "
                "(or the validation data holds NaN); lower the learning rate or check the data"
            )
        self.state.history.append({"step": self.state.step, "validation": value})
        if self.writer is not None:
            self.writer.add_scalar("validation", value, self.state.step)
        if value < self.state.best_validation:
            self.state.best_validation = value
            self.state.evaluations_without_improvement = 0
            self.best_weights = current
        else:
            self.state.evaluations_without_improvement += 1
        return self._patience_ran_out()

    def _patience_ran_out(self) -> bool:
        """Whether early stopping has ended the run (``patience`` validations without improvement)."""
        patience = self.config.patience
        return patience is not None and self.state.evaluations_without_improvement >= patience

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        """Save on rank 0 with every process's random state (called by every process together);
        weights holding NaN or inf are refused, so they never replace the last finite checkpoint."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise FloatingPointError(
                f"the weights hold NaN or inf at step {self.state.step}: not saved, so {self.directory} keeps "
                "the last checkpoint with finite weights; lower the learning rate or clip gradients"
            )
        states = gather_to_rank_zero(rng_state(self.device), self.world, self.rank)
        if self.rank == 0:
            self.save(rng_states=states)

    def save(self, rng_states: list[dict[str, Any]] | None = None) -> Path:
        """Write a resumable checkpoint to ``directory`` (atomically; see :mod:`flowforge.checkpoint`).

        ``rng_states``: every process's random state, rank 0 first (default: this process's).
        """
        if self.directory is None:
            raise ValueError("this trainer has no directory to save to")
        return save_training_state(
            self.directory,
            self._parts(),
            state=self.state,
            config=asdict(self.config),
            rng_states=rng_states if rng_states is not None else [rng_state(self.device)],
            best_weights=self.best_weights,
            metadata=self.metadata,
        )

    def load(self) -> None:
        """Restore the model, optimizer, schedule, EMA, RNG states and step from ``directory``."""
        if self.directory is None:
            raise ValueError("this trainer has no directory to load from")
        loaded = load_training_state(
            self.directory,
            self._parts(),
            config=asdict(self.config),
            rank=self.rank,
            world=self.world,
            metadata=self.metadata,
        )
        self.state, self.best_weights = loaded.state, loaded.best_weights
        if self.ema is not None:
            self.ema.updates = self.state.step  # one update per optimizer step

    def check_resume(self) -> None:
        """Refuse, before anything runs, a ``fit(resume=True)`` that would find ``directory``'s
        checkpoint made by another model, run or trainer config (:func:`check_resumable`); a
        folder without a checkpoint passes (the run starts from step 0)."""
        if self.directory is not None and (self.directory / "checkpoint.json").exists():
            check_resumable(self.directory, self.model, config=asdict(self.config), metadata=self.metadata)

    def _use_final_weights(self) -> bool:
        """Load the weights a finished run ends with (the best validated, else the moving average);
        returns whether that changed the model."""
        final = self.best_weights if self.best_weights is not None else self.ema.shadow if self.ema else None
        if final is None:
            return False
        live = self.model.state_dict()
        if all(torch.equal(live[name], value.to(live[name].device)) for name, value in final.items()):
            return False
        self.model.load_state_dict(final)
        return True

    def _parts(self) -> TrainingParts:
        return TrainingParts(self.model, self.optimizer, self.scheduler, self.scaler, self.objective, self.ema)

    def _write_metrics(self) -> None:
        keys = ["step", "loss", "lr", "validation"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        for row in self.state.history:
            writer.writerow({k: row.get(k, "") for k in keys})
        write_atomic(self.directory / "metrics.csv", buffer.getvalue().encode())


__all__ = ["PRECISIONS", "Trainer", "TrainerConfig", "TrainingInterrupted"]
