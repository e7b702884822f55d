r"""Training objectives: what the :class:`~flowforge.train.Trainer` minimises.

An :class:`Objective` maps a model and a batch to a scalar loss (``loss``) and to a number that
early stopping watches (``validation``). A batch is ``(x, context)``: ``x`` a tensor of rows or a
dict of tensors with the same rows (a policy's episode tensors), ``context`` a tensor or ``None``;
objectives that need no data (:class:`ReverseKL`) get ``None``.

* :class:`MaximumLikelihood`: :math:`-\frac1B\sum_i \log p_\theta(x_i \mid c_i)`.
* :class:`FlowMatchingObjective`: a :class:`~flowforge.matching.FlowMatcher`'s regression loss.
* :class:`PolicyObjective`: a policy's own loss on a batch dict.
* :class:`ReverseKL`: :math:`\mathbb E_{x\sim q}[\log q(x) - \log\tilde p(x)]` against an
  unnormalized log-density, with no data.
* :class:`AdversarialML`: Flow-GAN, maximum likelihood mixed with a discriminator's loss.

Under data-parallel training the Trainer calls ``loss`` inside the ``forward`` of the module that
``DistributedDataParallel`` wraps (see :mod:`flowforge.train.distributed`), so an objective may use
any of the model's methods (``log_prob``, ``loss``, ``sample_and_log_prob``): the gradients of every
parameter the loss reaches are averaged over processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowforge.eval.metrics import energy_distance
from flowforge.matching.consistency import DISTILLATION_METHODS, ConsistencyMatcher
from flowforge.validation import check_choice, check_count, check_real, check_widths, is_count

#: ``(x, context)``: ``x`` a tensor of rows or a dict of tensors with the same rows.
Batch = tuple[Tensor | dict[str, Tensor], Tensor | None]


class Objective:
    """A training objective: ``loss(model, batch) -> scalar`` (``batch`` is ``(x, context)``, or ``None``
    for objectives that need no data), and ``validation(model, batch) -> float`` for early stopping."""

    needs_data = True

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def validation(self, model: nn.Module, batch: Batch | None) -> float:
        return float(self.loss(model, batch))

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move what the objective owns (modules it trains) to the model's device and dtype; the
        :class:`~flowforge.train.Trainer` calls it once, before any checkpoint is loaded."""


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

    @torch.no_grad()
    def validation(self, model: nn.Module, batch: Batch | None) -> float:
        """The loss on the held-out batch; for a :class:`~flowforge.matching.ConsistencyMatcher`,
        :func:`one_step_sample_distance` to it."""
        x, context = batch
        if isinstance(model, ConsistencyMatcher):
            return one_step_sample_distance(model, x, context)
        return float(model.loss(x, context))


@torch.no_grad()
def one_step_sample_distance(
    model: ConsistencyMatcher, x1: Tensor, context: Tensor | None = None, max_rows: int = 2048, seed: int = 0
) -> float:
    """Energy distance between a consistency model's one-step samples and held-out data ``x1`` (its
    first ``max_rows`` rows, each sample drawn with its row's context), from noise of a fixed ``seed``.

    A consistency model's training loss is no yardstick across a run: the curriculum refines the
    grid, and the loss on a finer grid measures a different gap (it rises while the samples
    improve). What its user gets is its one-step samples, so validation and early stopping compare
    those with the data; the fixed seed makes successive validations differ by the weights only,
    and the caller's random stream is left as it was.
    """
    if x1.dim() < 1 or x1.shape[0] < 1:
        raise ValueError(f"x1 must hold one or more held-out rows, got shape {tuple(x1.shape)}")
    rows = min(x1.shape[0], check_count("max_rows", max_rows))
    x1 = x1[:rows]
    context = None if context is None else context[:rows]
    with torch.random.fork_rng(devices=[x1.device] if x1.device.type == "cuda" else []):
        torch.manual_seed(seed)
        samples = model.sample(rows) if context is None else model.sample(1, context)  # one draw per row
    return energy_distance(samples.reshape(rows, -1), x1.reshape(rows, -1))


class PolicyObjective(Objective):
    """A policy's own loss on a batch dict (``model.loss(batch)``): flow matching, regression or DDPM."""

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        data, _ = batch
        return model.loss(data)


class PolicyDistillation(Objective):
    """Distillation of a policy's ``consistency`` head from a frozen ``teacher`` flow policy
    (``model.distillation_loss(batch, teacher, method, intervals)``); validation uses the same loss."""

    def __init__(self, teacher: nn.Module, method: str = "consistency", intervals: int = 18) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a trained flow ChunkPolicy, got {type(teacher).__name__}")
        check_choice("method", method, DISTILLATION_METHODS)
        self.teacher = teacher.eval()
        self.method = method
        self.intervals = check_count("intervals", intervals)

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        data, _ = batch
        anchor = next(model.parameters())
        if next(self.teacher.parameters()).device != anchor.device:  # the Trainer moved the student
            self.teacher.to(anchor.device)
        return model.distillation_loss(data, self.teacher, self.method, self.intervals)


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
        if not callable(target):
            raise TypeError(f"target must be a log-density callable or a built-in name, got {type(target).__name__}")
        self.target = target
        self.samples = check_count("samples", samples)

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

    **Data-parallel training.** The discriminator is not part of the model, so it stays
    per-process: each process trains its own copy on its share of the batch and on its own
    samples, with its own optimizer, and nothing synchronises it (its update runs inside the
    flow's loss, before the flow's backward pass, and touches none of the flow's parameters).
    Only the flow's gradients are averaged. The checkpoint holds rank 0's discriminator, which
    every process loads on resume. For identical discriminators on every process, build them
    from the same seed and train on one process.

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

        ml_weight = check_real("ml_weight", ml_weight, non_negative=True)
        adversarial_weight = check_real("adversarial_weight", adversarial_weight, non_negative=True)
        if ml_weight + adversarial_weight == 0:
            raise ValueError("ml_weight = 0 and adversarial_weight = 0: at least one weight must be > 0")
        lr = check_real("lr", lr, positive=True)
        if discriminator is None:
            if features is None:
                raise ValueError("give features (for the default discriminator) or a discriminator")
            features = check_count("features", features)
            discriminator = MLP(features, 1, check_widths("hidden", hidden), nn.LeakyReLU)
        elif not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        else:
            features = None  # a module of the caller's: its input size is its own business
        self.features = features
        self.discriminator = discriminator
        self.ml_weight, self.adversarial_weight = ml_weight, adversarial_weight
        self.optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """The discriminator in the flow's device and dtype (in place: its optimizer keeps its parameters)."""
        self.discriminator.to(device, dtype)

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, context = batch
        if context is not None:
            raise ValueError("AdversarialML trains unconditional flows")
        if self.features is not None and (x.dim() != 2 or x.shape[1] != self.features):
            raise ValueError(
                f"AdversarialML(features={self.features}) got data of shape {tuple(x.shape)}: its discriminator "
                f"reads rows of {self.features} numbers"
            )
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


class NegativeELBO(Objective):
    r"""The negative evidence lower bound of a :class:`~flowforge.flows.vae.VAE`:
    :math:`-\frac1B \sum_i \mathrm{ELBO}(x_i)`, each ELBO a Monte-Carlo estimate with ``samples``
    reparametrised draws from the posterior (``model.elbo(x, samples)``). ``validation`` is the
    true negative ELBO (:math:`\beta = 1`), without gradients (noisy: one fresh draw per row and call).

    KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): with ``kl_warmup_steps`` = T > 0, training
    step t (counted from 0) weighs the latent term :math:`\log p(z) - \log q(z \mid x)` by
    :math:`\beta_t = \min(1, t / T)` (``model.elbo(x, samples, kl_weight=beta_t)``): the first steps
    fit the decoder before the KL term pulls the posterior towards the prior, so fewer latent units
    collapse onto it. The step counter is this objective's state (saved with a checkpoint, so a
    resumed run continues the schedule); only steps with gradients count.

    Arguments:
        samples: posterior draws per row and step, a positive int.
        kl_warmup_steps: steps over which :math:`\beta` rises linearly from 0 to 1 (0: no warm-up).
    """

    def __init__(self, samples: int = 1, kl_warmup_steps: int = 0) -> None:
        self.samples = check_count("samples", samples)
        if not is_count(kl_warmup_steps, low=0):
            raise ValueError(f"kl_warmup_steps must be an int >= 0 (0: no warm-up), got {kl_warmup_steps!r}")
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.steps_taken = 0

    def kl_weight(self) -> float:
        r""":math:`\beta` of the next training step."""
        return min(1.0, self.steps_taken / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0

    def loss(self, model: nn.Module, batch: Batch | None) -> Tensor:
        x, context = batch
        if context is not None:
            raise ValueError("NegativeELBO trains unconditional VAEs: the batch's context must be None")
        training = torch.is_grad_enabled()  # validation runs without gradients, on the bound itself
        beta = self.kl_weight() if training else 1.0
        self.steps_taken += int(training)
        return -model.elbo(x, self.samples, kl_weight=beta).mean()

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])


__all__ = [
    "AdversarialML",
    "Batch",
    "FlowMatchingObjective",
    "MaximumLikelihood",
    "NegativeELBO",
    "Objective",
    "PolicyObjective",
    "ReverseKL",
    "one_step_sample_distance",
]
