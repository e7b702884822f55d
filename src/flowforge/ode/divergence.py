r"""Divergence estimators for continuous normalizing flows, and an unbiased series estimator.

The instantaneous change of variables needs :math:`\nabla\!\cdot v = \operatorname{tr}(\partial v / \partial x)`.

* :class:`ExactDivergence`: the trace from the :math:`D` rows of the Jacobian (exact). The rows
  come from one batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``,
  vmap from torch.func underneath) where that pays, or from :math:`D` separate backward passes.
* :class:`HutchinsonDivergence`: :math:`\varepsilon^\top (\partial v/\partial x)\, \varepsilon` with
  :math:`\mathbb E[\varepsilon\varepsilon^\top] = I` (Gaussian or Rademacher probes): one
  vector-Jacobian product, unbiased. As in FFJORD, one probe is drawn per solve and held fixed
  along the trajectory, so the integrand stays a smooth function of time.

:func:`russian_roulette` estimates an infinite series :math:`\sum_{k\ge1} a_k` without bias from
finitely many terms: draw :math:`N \sim \mathrm{Geometric}(p)` and return
:math:`\sum_{k=1}^{N} a_k / P(N \ge k)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class ExactDivergence:
    r"""Exact divergence of ``v`` with respect to ``x`` (both (batch, D)), differentiable when asked.

    With ``frobenius=True`` it also returns :math:`\|\partial v/\partial x\|_F^2`, exact, from
    the same Jacobian rows.

    Arguments:
        batched: get all :math:`D` Jacobian rows from one vmapped vector-Jacobian product
            (``True``), from :math:`D` backward passes (``False``), or choose by dimension
            (``"auto"``: batched for :math:`4 \le D \le` :attr:`BATCHED_MAX_FEATURES`). Batching
            runs the backward pass once on a (D, batch, D) cotangent: about 1.7x faster than the
            loop at D = 8 and 32 for a 64-64 MLP on a CPU, the same at D = 2, at D times the memory.
    """

    #: Largest dimension for which ``batched="auto"`` vectorizes (memory grows as D^2 x batch).
    BATCHED_MAX_FEATURES = 64

    def __init__(self, batched: bool | str = "auto") -> None:
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        self.batched = batched
        self._batching_failed = False

    def _use_batched(self, features: int) -> bool:
        if self._batching_failed:
            return False
        if self.batched == "auto":
            return 4 <= features <= self.BATCHED_MAX_FEATURES
        return bool(self.batched)

    def __call__(
        self, v: Tensor, x: Tensor, create_graph: bool, frobenius: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        features = x.shape[1]
        if self._use_batched(features):
            basis = torch.eye(features, dtype=v.dtype, device=v.device)[:, None, :].expand(features, *v.shape)
            try:
                (rows,) = torch.autograd.grad(
                    v, x, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True
                )  # rows[i] = d v_i / d x, shape (D, batch, D)
            except RuntimeError:
                # Some layers' double backward has no batching rule (GroupNorm's, in a U-Net): the
                # loop below gives the same rows; an error of the model itself recurs there.
                self._batching_failed = True
            else:
                total = rows.diagonal(dim1=0, dim2=2).sum(-1)
                return (total, rows.square().sum((0, 2))) if frobenius else total
        total = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
        squares = torch.zeros_like(total)
        for i in range(x.shape[1]):
            (row,) = torch.autograd.grad(v[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
            total = total + row[:, i]
            if frobenius:
                squares = squares + row.square().sum(1)
        return (total, squares) if frobenius else total

    def reset(self, x: Tensor) -> None:
        """Nothing to draw: the exact trace has no randomness."""


class HutchinsonDivergence:
    """Hutchinson's trace estimator with a probe drawn by :meth:`reset` and reused until the next one.

    Arguments:
        probe: ``"rademacher"`` (entries +-1, lowest variance for a fixed Jacobian) or ``"gaussian"``.
    """

    def __init__(self, probe: str = "rademacher") -> None:
        if probe not in ("rademacher", "gaussian"):
            raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
        self.probe = probe
        self._epsilon: Tensor | None = None

    def reset(self, x: Tensor) -> None:
        """Draw a new probe shaped like ``x``."""
        if self.probe == "gaussian":
            self._epsilon = torch.randn_like(x)
        else:
            self._epsilon = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1

    def __call__(
        self, v: Tensor, x: Tensor, create_graph: bool, frobenius: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""The trace estimate; with ``frobenius=True`` also :math:`\|\varepsilon^\top J\|^2`, an
        unbiased estimate of :math:`\|J\|_F^2` from the same vector-Jacobian product."""
        if self._epsilon is None or self._epsilon.shape != x.shape:
            self.reset(x)
        (vjp,) = torch.autograd.grad(v, x, self._epsilon, create_graph=create_graph, retain_graph=True)
        divergence = (vjp * self._epsilon).sum(1)
        return (divergence, vjp.square().sum(1)) if frobenius else divergence


def roulette_weights(p: float = 0.5, min_terms: int = 1, generator: torch.Generator | None = None) -> list[float]:
    r"""One Russian-roulette draw: the weights :math:`1 / P(N \ge k)` of the terms :math:`k = 1..N` to keep.

    The first ``min_terms`` terms are always kept (weight 1); beyond them the count of extra
    terms is geometric, :math:`P(\text{extra} \ge j) = (1 - p)^j`, so term ``min_terms + j`` gets
    weight :math:`(1 - p)^{-j}`. Then :math:`\mathbb E \sum_k w_k a_k = \sum_k a_k` for any
    absolutely convergent series: the estimator of :func:`russian_roulette` and of the residual
    flows' log-determinant (:class:`flowforge.transforms.ResidualBlock`).
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if min_terms < 1:
        raise ValueError(f"min_terms must be >= 1, got {min_terms}")
    u = float(torch.rand((), generator=generator))
    extra = math.floor(math.log1p(-u) / math.log1p(-p))
    return [(1 - p) ** -max(k - min_terms, 0) for k in range(1, min_terms + extra + 1)]


def russian_roulette(
    term: Callable[[int], Tensor], p: float = 0.5, min_terms: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    r"""Unbiased estimate of :math:`\sum_{k\ge1} a_k` with ``term(k)`` returning :math:`a_k`.

    The first ``min_terms`` terms are always computed; beyond them each further term is kept
    with probability ``1 - p`` and reweighted by the inverse probability of reaching it, so the
    expectation is the full sum (for absolutely convergent series). See :func:`roulette_weights`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> draws = torch.stack([russian_roulette(lambda k: torch.tensor(0.5**k), generator=g) for _ in range(4000)])
    >>> abs(float(draws.mean()) - 1.0) < 0.05
    True
    """
    weights = roulette_weights(p, min_terms, generator)
    total = term(1) * weights[0]
    for k, weight in enumerate(weights[1:], start=2):
        total = total + term(k) * weight
    return total
