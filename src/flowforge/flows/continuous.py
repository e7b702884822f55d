"""Continuous normalizing flows (FFJORD): the :class:`CNF` recipe.

The flow map and its log-determinant come from
:class:`flowforge.transforms.continuous.ContinuousFlowTransform` (the instantaneous change of
variables); this module adds the standard-normal base, the velocity MLP and the RNODE terms.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from flowforge.distributions import StandardNormal
from flowforge.flows.base import Flow
from flowforge.nn import VelocityMLP
from flowforge.registry import record_arguments, register
from flowforge.transforms.continuous import ContinuousFlowTransform
from flowforge.validation import check_batched, check_count, model_dtype


@register("cnf")
class CNF(Flow):
    """Continuous normalizing flow (FFJORD): N(0, I) pushed through a time-dependent velocity MLP.

    Arguments:
        features: data dimension.
        context: size of the context vector (0 for an unconditional flow).
        hidden: hidden widths of the velocity MLP (input ``[x, t, context]``).
        trace: ``"exact"`` (cost grows with ``features``) or ``"hutchinson"`` (one probe, unbiased).
        method, atol, rtol, adjoint, steps: see :class:`ContinuousFlowTransform`; all checked here,
            at construction (``steps`` only with a fixed-step method, ``atol``/``rtol`` only with
            an adaptive one).

    Inputs follow the input rule of :mod:`flowforge.validation`, like every :class:`Flow`:
    ``log_prob`` of 0 rows is an empty ``(0,)`` tensor (no solve).

    >>> import torch
    >>> flow = CNF(2, hidden=(16,), method="rk4", steps=5)
    >>> flow.log_prob(torch.randn(3, 2)).shape, flow.sample(4).shape
    (torch.Size([3]), torch.Size([4, 2]))
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        trace: str = "exact",
        method: str = "dopri5",
        atol: float | None = None,
        rtol: float | None = None,
        adjoint: bool = False,
        *,
        steps: int | None = None,
    ) -> None:
        features = check_count("features", features)
        velocity = VelocityMLP(features, context, hidden)
        transform = ContinuousFlowTransform(velocity, features, context, trace, method, steps, atol, rtol, adjoint)
        super().__init__(StandardNormal(features), transform)

    def log_prob_and_regularization(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``log_prob`` with the RNODE terms: returns ``(log_prob, kinetic, jacobian)``, each (batch,).

        Train with ``-(log_prob - lambda_k * kinetic - lambda_j * jacobian).mean()`` for straighter,
        cheaper-to-solve trajectories.
        """
        x = check_batched("x", x, self.event_shape, finite=True, dtype=model_dtype(self))
        embedded = self._embed(context, batch=x.shape[0], batch_of="x")
        z, logabsdet, kinetic, jacobian = self.transform.forward_with_regularization(x, embedded)
        return self.base.log_prob(z) + logabsdet, kinetic, jacobian

    def set_solver(
        self, method: str, steps: int | None = None, atol: float | None = None, rtol: float | None = None
    ) -> None:
        """Solve with another method from now on (see :meth:`ContinuousFlowTransform.set_solver`);
        a saved flow rebuilds with it. Setting the transform's attributes directly skips the checks
        and is not saved."""
        self.transform.set_solver(method, steps, atol, rtol)
        transform = self.transform
        record_arguments(self, method=transform.method, steps=transform.steps, atol=transform.atol, rtol=transform.rtol)

    @property
    def last_nfe(self) -> int:
        """Velocity evaluations of the most recent solve (a measure of how hard the ODE is)."""
        return self.transform.last_nfe
