r"""Probability paths: how a noisy point :math:`x_t` is built from noise :math:`x_0` and data :math:`x_1`.

Every path here is *affine*: with a scheduler :math:`(\alpha_t, \sigma_t)`,

.. math:: x_t = \alpha_t\, x_1 + \sigma_t\, x_0, \qquad
          u_t = \frac{d x_t}{dt} = \dot\alpha_t\, x_1 + \dot\sigma_t\, x_0,

with :math:`x_0 \sim \mathcal N(0, I)`, time 0 at the noise end and 1 at the data end. A model
trained to regress :math:`u_t` learns the marginal velocity
:math:`v(x, t) = \dot\alpha_t\, \hat x_1 + \dot\sigma_t\, \hat x_0`, where
:math:`\hat x_1 = \mathbb E[x_1 \mid x_t = x]` and :math:`\hat x_0 = \mathbb E[x_0 \mid x_t = x]`.
Since also :math:`x = \alpha_t \hat x_1 + \sigma_t \hat x_0`, the two predictions follow from the
velocity in closed form (a 2x2 linear system):

.. math:: \hat x_1 = \frac{\dot\sigma_t x - \sigma_t v}{\dot\sigma_t \alpha_t - \sigma_t \dot\alpha_t},
          \qquad \hat x_0 = \frac{\dot\alpha_t x - \alpha_t v}{\dot\alpha_t \sigma_t - \alpha_t \dot\sigma_t},

and by Tweedie's formula the score of the marginal is :math:`\nabla \log p_t(x) = -\hat x_0 / \sigma_t`.
So one trained model can be read as a velocity, a data predictor, a noise predictor or a score,
and sampled as an ODE or as an SDE (:meth:`FlowMatcher.sample_sde
<flowforge.matching.FlowMatcher.sample_sde>`).

Paths: :class:`LinearPath` (rectified flow / conditional OT), :class:`VariancePreservingPath`
(the diffusion bridge: a diffusion model is flow matching on this path), :class:`CosinePath`, and
:class:`StochasticInterpolantPath` (an extra noise term :math:`\gamma(t) z`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowforge.registry import register
from flowforge.validation import check_real


def check_sigma_floor(value: object, *, positive: bool = False) -> float:
    r"""A floor under :math:`\sigma_t` (see :meth:`AffinePath.data_to_velocity`): a number in
    [0, 1), or in (0, 1) when ``positive``."""
    floor = check_real("sigma_floor", value)
    if not (0 < floor < 1 if positive else 0 <= floor < 1):
        raise ValueError(f"sigma_floor = {value!r}: expected a number in {'(0, 1)' if positive else '[0, 1)'}")
    return floor


def _expand(coefficient: Tensor, like: Tensor) -> Tensor:
    """Coefficients of a leading shape of ``like`` ((batch,), or (batch, tokens) for per-token times)
    broadcast over its remaining dims."""
    return coefficient.reshape(*coefficient.shape, *([1] * (like.dim() - coefficient.dim()))).to(like.dtype)


class AffinePath:
    r"""Base class: subclasses give the scheduler :math:`\alpha_t, \sigma_t` and their time derivatives."""

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""``(alpha, sigma, d_alpha, d_sigma)`` at times ``t`` (batch,), each (batch,)."""
        raise NotImplementedError

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""The point :math:`x_t` and the conditional target velocity :math:`u_t = d x_t / dt`."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x1) for c in self.schedule(t))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    # Conversions between what a network may predict. All take x = x_t and t (batch,).
    def velocity_to_data(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat x_1` from the velocity."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.schedule(t))
        return (d_sigma * x - sigma * velocity) / (d_sigma * alpha - sigma * d_alpha)

    def velocity_to_noise(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat x_0` from the velocity."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.schedule(t))
        return (d_alpha * x - alpha * velocity) / (d_alpha * sigma - alpha * d_sigma)

    def velocity_to_score(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\nabla_x \log p_t(x) = -\hat x_0 / \sigma_t` (undefined where :math:`\sigma_t = 0`)."""
        sigma = _expand(self.schedule(t)[1], x)
        return -self.velocity_to_noise(velocity, x, t) / sigma

    def data_to_velocity(self, data: Tensor, x: Tensor, t: Tensor, sigma_floor: float = 0.0) -> Tensor:
        r"""The velocity from :math:`\hat x_1` (with :math:`\hat x_0 = (x - \alpha_t \hat x_1)/\sigma_t`).

        Written :math:`\big((\dot\alpha_t \sigma_t - \dot\sigma_t \alpha_t)\,\hat x_1 +
        \dot\sigma_t x\big) / \sigma_t`, whose denominator is read as at least ``sigma_floor``, so
        that the velocity stays finite at the data end (:math:`\sigma_1 = 0` on the linear path,
        where it is :math:`(\hat x_1 - x) / \max(1 - t, s)`). Finite, not exact: where
        :math:`\sigma_t < s` it is not the limit along a trajectory, so a solver whose stages land
        on t = 1 (Heun, RK4, adaptive methods) misreads it there; Euler and midpoint steps do not.
        """
        floor = check_sigma_floor(sigma_floor)
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.schedule(t))
        return ((d_alpha * sigma - d_sigma * alpha) * data + d_sigma * x) / sigma.clamp_min(floor)

    def noise_to_velocity(self, noise: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r"""The velocity from :math:`\hat x_0` (with :math:`\hat x_1 = (x - \sigma_t \hat x_0)/\alpha_t`)."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.schedule(t))
        return d_alpha * (x - sigma * noise) / alpha + d_sigma * noise

    def score_to_velocity(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r"""The velocity from the score (:math:`\hat x_0 = -\sigma_t \nabla \log p_t`)."""
        sigma = _expand(self.schedule(t)[1], x)
        return self.noise_to_velocity(-sigma * score, x, t)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@register("linear", "path")
class LinearPath(AffinePath):
    r"""Rectified flow / conditional OT: :math:`\alpha_t = t`, :math:`\sigma_t = 1 - (1 - \sigma_{\min}) t`.

    With ``sigma_min = 0`` this is :math:`x_t = (1-t) x_0 + t x_1`, :math:`u_t = x_1 - x_0`.

    >>> import torch
    >>> x0, x1, t = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.25, 0.5])
    >>> xt, ut = LinearPath().sample(x0, x1, t)
    >>> xt[:, 0].tolist(), ut[0].tolist()
    ([0.25, 0.5], [1.0, 1.0, 1.0])
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        self.sigma_min = check_real("sigma_min", sigma_min, non_negative=True)
        if self.sigma_min >= 1.0:
            raise ValueError(f"sigma_min must be a finite number in [0, 1), got {sigma_min!r}")

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        slope = 1.0 - self.sigma_min
        return t, 1.0 - slope * t, torch.ones_like(t), torch.full_like(t, -slope)


@register("cosine", "path")
class CosinePath(AffinePath):
    r""":math:`\alpha_t = \sin(\pi t / 2)`, :math:`\sigma_t = \cos(\pi t / 2)`: variance preserving for
    unit-variance data, smooth at both ends."""

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        angle = 0.5 * math.pi * t
        return angle.sin(), angle.cos(), 0.5 * math.pi * angle.cos(), -0.5 * math.pi * angle.sin()


@register("variance-preserving", "path")
class VariancePreservingPath(AffinePath):
    r"""The path of a variance-preserving diffusion (Song et al. 2021), in flow-matching time.

    With :math:`s = 1 - t` the diffusion time and :math:`T(s) = \beta_{\min} s + \tfrac12
    (\beta_{\max} - \beta_{\min}) s^2`: :math:`\alpha_t = e^{-T(s)/2}`,
    :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`. Training a velocity on this path and sampling its ODE
    is the probability-flow ODE of the diffusion model; :meth:`velocity_to_score` gives its score.

    Neither end is exact, as in diffusion models: at the noise end :math:`\alpha_0 = e^{-T(1)/2}`
    (0.0066 with the defaults) so :math:`x_0` still carries a trace of the data, which a sampler
    starting from :math:`\mathcal N(0, I)` ignores; and :math:`\dot\sigma_t` diverges as
    :math:`t \to 1`, so ``s`` is floored at ``s_min`` (1e-5), leaving
    :math:`\sigma_1 \approx \sqrt{\beta_{\min} s_{\min}}` instead of 0.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, s_min: float = 1e-5) -> None:
        self.beta_min = check_real("beta_min", beta_min, positive=True)
        self.beta_max = check_real("beta_max", beta_max, positive=True)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be a finite number >= beta_min ({beta_min!r}), got {beta_max!r}")
        self.s_min = check_real("s_min", s_min, positive=True)
        if self.s_min >= 1.0:
            raise ValueError(f"s_min must be a finite number in (0, 1), got {s_min!r}")

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = (1.0 - t).clamp(min=self.s_min)
        integral = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s.square()
        rate = self.beta_min + (self.beta_max - self.beta_min) * s  # dT/ds
        alpha = torch.exp(-0.5 * integral)
        sigma = torch.sqrt(-torch.expm1(-integral))
        d_alpha = 0.5 * rate * alpha  # ds/dt = -1
        d_sigma = -alpha * d_alpha / sigma
        return alpha, sigma, d_alpha, d_sigma


@register("stochastic-interpolant", "path")
class StochasticInterpolantPath(AffinePath):
    r"""A stochastic interpolant (Albergo et al. 2023): :math:`x_t = \alpha_t x_1 + \sigma_t x_0 + \gamma_t z`
    with :math:`z \sim \mathcal N(0, I)` independent and :math:`\gamma_t = g\, t (1 - t)`.

    The target is :math:`u_t = \dot\alpha_t x_1 + \dot\sigma_t x_0 + \dot\gamma_t z`. Since
    :math:`\sigma_t x_0 + \gamma_t z` is Gaussian with standard deviation
    :math:`\tilde\sigma_t = \sqrt{\sigma_t^2 + \gamma_t^2}`, the *marginal* velocity is the one
    of the affine path :math:`(\alpha_t, \tilde\sigma_t)`, and :meth:`schedule` returns that path,
    so the conversions above hold unchanged. The extra noise smooths the intermediate
    marginals (at the price of a noisier regression target).

    Arguments:
        base: the deterministic part (default :class:`LinearPath`).
        gamma_scale: ``g``, the size of the added noise.
    """

    def __init__(self, base: AffinePath | None = None, gamma_scale: float = 1.0) -> None:
        if base is not None and not isinstance(base, AffinePath):
            raise TypeError(f"base must be an AffinePath (e.g. LinearPath()) or None, got {type(base).__name__}")
        gamma_scale = check_real("gamma_scale", gamma_scale, non_negative=True)
        self.base = base if base is not None else LinearPath()
        self.gamma_scale = gamma_scale

    def gamma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\gamma_t` and :math:`\dot\gamma_t`."""
        return self.gamma_scale * t * (1 - t), self.gamma_scale * (1 - 2 * t)

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x1) for c in self.base.schedule(t))
        gamma, d_gamma = (_expand(c, x1) for c in self.gamma(t))
        z = torch.randn_like(x1)
        return alpha * x1 + sigma * x0 + gamma * z, d_alpha * x1 + d_sigma * x0 + d_gamma * z

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha, sigma, d_alpha, d_sigma = self.base.schedule(t)
        gamma, d_gamma = self.gamma(t)
        total = torch.sqrt(sigma.square() + gamma.square())
        # d/dt sqrt(s^2 + g^2). Where both vanish (t = 1 on the linear path) the ratio is 0/0; both
        # vanish linearly there, so the total falls as |t - 1| sqrt(s'^2 + g'^2): its slope from the left.
        d_total = torch.where(
            total > 0,
            (sigma * d_sigma + gamma * d_gamma) / total.clamp(min=torch.finfo(total.dtype).tiny),
            -torch.sqrt(d_sigma.square() + d_gamma.square()),
        )
        return alpha, total, d_alpha, d_total


__all__ = ["AffinePath", "CosinePath", "LinearPath", "StochasticInterpolantPath", "VariancePreservingPath"]
