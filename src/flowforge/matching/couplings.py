r"""Couplings: which noise sample :math:`x_0` is paired with which data sample :math:`x_1` in a minibatch.

A coupling is called as ``coupling(x0, x1, context=None) -> x0_paired``: it returns the noise
batch reordered (or resampled) so that row ``i`` of the result is paired with row ``i`` of
``x1``. The data and its context keep their order, which is what makes conditional pairing
simple.

* :class:`IndependentCoupling`: the pairing as drawn (independent CFM).
* :class:`ExactOTCoupling`: the minibatch optimal-transport pairing for the squared Euclidean
  cost (OT-CFM; Tong et al. 2024, Pooladian et al. 2023), solved exactly by POT's network simplex.
  With equal batch sizes and uniform weights an optimal plan exists that is a permutation
  matrix; the coupling returns that permutation, so every noise sample is used exactly once
  (no sampling with replacement from the plan).
* :class:`SinkhornCoupling`: the entropic plan (Sinkhorn); each data row draws its noise partner
  from its column of the plan (a stochastic, smoother pairing).

With a context, OT is solved separately within each group of rows that share the same context
(``per_condition=True``, the default): noise is never moved from one condition to another, so the
conditional marginals stay right. With a continuous context (every row distinct) each group
has one row and the pairing is the independent one: OT across conditions would change what the
model learns, so discretise the context if minibatch OT should apply.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowforge.config import MAX_SEED
from flowforge.registry import constructor_repr, register
from flowforge.validation import check_bool, check_count, check_real


class Coupling:
    """Base class: ``__call__(x0, x1, context=None) -> x0 reordered to pair with x1 row by row``."""

    def __call__(self, x0: Tensor, x1: Tensor, context: Tensor | None = None) -> Tensor:
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        return x0

    def __repr__(self) -> str:
        return constructor_repr(self)


@register("independent", "coupling")
class IndependentCoupling(Coupling):
    """Pairs noise and data as drawn: the independent coupling of conditional flow matching."""


def _condition_groups(context: Tensor | None, n: int) -> list[Tensor]:
    """Row indices grouped by identical context rows (one group of everything without a context)."""
    if context is None:
        return [torch.arange(n)]
    flat = context.reshape(n, -1)
    _, labels = torch.unique(flat, dim=0, return_inverse=True)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    return list(torch.split(order.cpu(), counts.tolist()))


def _squared_distances(x0: Tensor, x1: Tensor) -> np.ndarray:
    a = x0.detach().reshape(x0.shape[0], -1).double()
    b = x1.detach().reshape(x1.shape[0], -1).double()
    return torch.cdist(a, b).square().cpu().numpy()


class _PerConditionCoupling(Coupling):
    """Solves a pairing within each condition group; subclasses give ``pair(cost) -> noise index per data row``."""

    def __init__(self, per_condition: bool = True) -> None:
        self.per_condition = check_bool("per_condition", per_condition)

    def pair(self, cost: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x0: Tensor, x1: Tensor, context: Tensor | None = None) -> Tensor:
        super().__call__(x0, x1, context)
        n = x1.shape[0]
        groups = _condition_groups(context if self.per_condition else None, n)
        partner = torch.empty(n, dtype=torch.long)
        for rows in groups:
            if rows.numel() == 1:
                partner[rows] = rows
                continue
            cost = _squared_distances(x0[rows.to(x0.device)], x1[rows.to(x1.device)])
            partner[rows] = rows[torch.from_numpy(self.pair(cost))]
        return x0[partner.to(x0.device)]


@register("exact-ot", "coupling")
class ExactOTCoupling(_PerConditionCoupling):
    r"""Exact minibatch OT pairing (squared Euclidean cost) through POT's ``ot.emd``.

    Returns a true permutation of the noise batch: row ``j`` of the result is the noise sample the
    optimal plan sends to data row ``j``. Should the solver return a plan that is not a
    permutation matrix (degenerate costs can give a non-vertex optimum), the pairing falls back
    to a linear assignment solve on the same costs, which is optimal too.

    Arguments:
        per_condition: solve OT separately within groups of identical context rows.

    >>> import torch
    >>> x1 = torch.tensor([[0.0], [10.0]])
    >>> ExactOTCoupling()(torch.tensor([[9.0], [1.0]]), x1).flatten().tolist()
    [1.0, 9.0]
    """

    def pair(self, cost: np.ndarray) -> np.ndarray:
        import ot  # imported on use: POT is only needed by the OT couplings

        n = cost.shape[0]
        weights = np.full(n, 1.0 / n)
        plan = ot.emd(weights, weights, cost, numItermax=max(100_000, 50 * n * n))
        partner = plan.argmax(axis=0)  # noise row for each data column
        if np.array_equal(np.sort(partner), np.arange(n)) and np.allclose(plan[partner, np.arange(n)], 1.0 / n):
            return partner
        from scipy.optimize import linear_sum_assignment

        noise_rows, data_cols = linear_sum_assignment(cost)
        partner = np.empty(n, dtype=np.int64)
        partner[data_cols] = noise_rows
        return partner


@register("sinkhorn", "coupling")
class SinkhornCoupling(_PerConditionCoupling):
    r"""Entropic OT pairing: Sinkhorn's plan for cost :math:`C / \overline{C}` (normalised by its mean)
    and regularisation ``reg``; every data row draws its noise partner from its column of the plan.

    Unlike :class:`ExactOTCoupling` this draws with replacement (a noise sample can be used
    twice), as an entropic plan is not a permutation; small ``reg`` approaches the exact pairing.

    Arguments:
        reg: entropic regularisation (relative to the mean cost).
        per_condition: solve within groups of identical context rows.
        seed: seed of the coupling's own random generator for the draws (a rebuilt model starts it
            again from the seed); ``None``: PyTorch's global generator.
    """

    def __init__(self, reg: float = 0.05, per_condition: bool = True, seed: int | None = None) -> None:
        super().__init__(per_condition)
        self.reg = check_real("reg", reg, positive=True)
        self.seed = None if seed is None else check_count("seed", seed, low=0, high=MAX_SEED)
        self.generator = None if seed is None else torch.Generator().manual_seed(self.seed)

    def pair(self, cost: np.ndarray) -> np.ndarray:
        import ot

        n = cost.shape[0]
        weights = np.full(n, 1.0 / n)
        scaled = cost / max(cost.mean(), 1e-12)
        # Plain Sinkhorn is ~10x faster than the log-domain one but exp(-C/reg) underflows in float64
        # near C/reg ~ 700: an outlier far from the batch's mean cost gets there even at reg = 0.05.
        # stopThr bounds the marginal error; 1e-5 is far below what drawing partners can resolve.
        plain = scaled.max() / self.reg < 500
        plan = ot.sinkhorn(
            weights,
            weights,
            scaled,
            self.reg,
            method="sinkhorn" if plain else "sinkhorn_log",
            numItermax=10_000,
            stopThr=1e-5,
        )
        columns = torch.from_numpy(np.ascontiguousarray(plan.T)).clamp(min=0)
        totals = columns.sum(1, keepdim=True)
        if not bool(torch.isfinite(columns).all()) or not bool((totals > 0).all()):
            raise ValueError(
                f"Sinkhorn's plan at reg={self.reg!r} has a column without mass (a data row no noise row reaches); "
                "a larger reg, or ExactOTCoupling, pairs this batch"
            )
        columns = columns / totals
        return torch.multinomial(columns, 1, generator=self.generator).squeeze(1).numpy()


__all__ = ["Coupling", "ExactOTCoupling", "IndependentCoupling", "SinkhornCoupling"]
