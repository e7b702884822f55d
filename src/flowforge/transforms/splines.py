r"""Monotone rational-quadratic splines with linear tails (Durkan et al. 2019).

On :math:`[-B, B]` the map is made of :math:`K` rational-quadratic pieces through the knots
:math:`(x^{(k)}, y^{(k)})`, with positive derivatives :math:`\delta^{(k)}` at the knots; outside
it is the identity (slope 1, matching :math:`\delta^{(0)} = \delta^{(K)} = 1`). In bin :math:`k`
with :math:`w = x^{(k+1)} - x^{(k)}`, :math:`h = y^{(k+1)} - y^{(k)}`, :math:`s = h / w` and
:math:`\xi = (x - x^{(k)}) / w \in [0, 1]`:

.. math::
    y = y^{(k)} + \frac{h\,[s\xi^2 + \delta^{(k)}\xi(1-\xi)]}{s + [\delta^{(k+1)} + \delta^{(k)} - 2s]\,\xi(1-\xi)},
    \qquad
    \frac{dy}{dx} = \frac{s^2\,[\delta^{(k+1)}\xi^2 + 2s\xi(1-\xi) + \delta^{(k)}(1-\xi)^2]}
                         {(s + [\delta^{(k+1)} + \delta^{(k)} - 2s]\,\xi(1-\xi))^2}.

The inverse solves the quadratic :math:`a\xi^2 + b\xi + c = 0` for its root in [0, 1] in the
cancellation-free form :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`.

Numerical safety, by construction rather than by luck:

* the first and last knots are exactly :math:`\pm B` (the normalised cumulative sum ends at
  exactly 1), so no input falls between bins because a sum was rounded;
* bins are found by counting interior knots :math:`\le x`, so inputs exactly on a knot get a
  well-defined bin, and the bin index can never leave ``[0, K-1]``;
* the spline branch is evaluated on inputs clamped into :math:`[-B, B]`, so tail inputs (even
  ``1e30``) never make the discarded branch produce inf/NaN that would poison gradients;
* the discriminant is floored at the smallest normal number (so neither it nor the gradient of
  its square root can go NaN) and :math:`\xi` is clamped into [0, 1] against rounding.

Reference: Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows. NeurIPS 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowforge.transforms.elementwise import ElementwiseTransformer
from flowforge.validation import check_count, check_real

#: Smallest bin width/height as a fraction of the interval, and smallest knot derivative.
MIN_BIN_SIZE = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(x) + MIN_DERIVATIVE = 1 at this x: a zero conditioner output gives slope 1.
_UNIT_DERIVATIVE_OFFSET = math.log(math.expm1(1 - MIN_DERIVATIVE))


def _interior_knots(raw: Tensor, bound: float) -> Tensor:
    """The K-1 interior knots (..., K-1) of bins whose sizes are a floored softmax of ``raw``.

    The softmax is written out (exp, cumsum, divide by the running total's last entry) because
    that is several times faster than ``torch.softmax`` on a short last dimension, and because
    ``cum / cum[-1]`` hits exactly 1 at the end, so no rounding can push a knot past ``bound``.
    """
    bins = raw.shape[-1]
    weights = torch.exp(raw - raw.detach().amax(-1, keepdim=True))
    cumulative = torch.cumsum(weights, dim=-1)
    fraction = cumulative[..., :-1] / cumulative[..., -1:]
    floor = MIN_BIN_SIZE * torch.arange(1, bins, dtype=raw.dtype, device=raw.device)
    return -bound + 2 * bound * (floor + (1 - MIN_BIN_SIZE * bins) * fraction)


def _with_ends(interior: Tensor, low: float, high: float) -> Tensor:
    return F.pad(F.pad(interior, (1, 0), value=low), (0, 1), value=high)


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    bound: float,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply the spline elementwise; return outputs and ``log|d out / d in|`` (same shape as inputs).

    Arguments:
        inputs: tensor of any shape ``(...)``.
        unnormalized_widths: ``(..., K)``, softmax-normalised into bin widths.
        unnormalized_heights: ``(..., K)``, softmax-normalised into bin heights.
        unnormalized_derivatives: ``(..., K-1)``, softplus into the interior knot derivatives.
        bound: half-width ``B`` of the spline interval; identity outside.
        inverse: compute the inverse map instead.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.tensor([-9.0, -1.0, 0.0, 2.5, 1e30])
    >>> w, h, d = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3)
    >>> y, logdet = rational_quadratic_spline(x, w, h, d, bound=3.0)
    >>> x_back, _ = rational_quadratic_spline(y, w, h, d, bound=3.0, inverse=True)
    >>> bool(torch.allclose(x_back, x, atol=1e-5)), bool(torch.isfinite(logdet).all())
    (True, True)
    """
    bins = unnormalized_widths.shape[-1]
    if unnormalized_heights.shape[-1] != bins or unnormalized_derivatives.shape[-1] != bins - 1:
        raise ValueError(
            f"spline parameters must have K, K and K-1 entries in the last dimension, got "
            f"{unnormalized_widths.shape[-1]}, {unnormalized_heights.shape[-1]}, {unnormalized_derivatives.shape[-1]}"
        )
    sizes = torch.stack([unnormalized_widths, unnormalized_heights], dim=-2)
    return _spline(inputs, sizes, unnormalized_derivatives, bound, inverse)


def _spline(
    inputs: Tensor, unnormalized_sizes: Tensor, unnormalized_derivatives: Tensor, bound: float, inverse: bool
) -> tuple[Tensor, Tensor]:
    """The spline with bin widths and heights stacked as ``(..., 2, K)``: their knots are then
    computed together, halving the number of small tensor operations on the hot path."""
    bins = unnormalized_sizes.shape[-1]
    if bins * MIN_BIN_SIZE >= 1:
        raise ValueError(f"too many bins ({bins}) for the minimum bin size {MIN_BIN_SIZE}")
    interior = _interior_knots(unnormalized_sizes, bound)  # (..., 2, K-1): x then y knots
    interior_derivatives = MIN_DERIVATIVE + F.softplus(unnormalized_derivatives + _UNIT_DERIVATIVE_OFFSET)

    inside = (inputs >= -bound) & (inputs <= bound)
    clamped = inputs.clamp(-bound, bound)
    # Number of interior knots <= input: a bin in [0, K-1], well defined even exactly on a knot.
    search = interior[..., 1 if inverse else 0, :].detach()
    index = (clamped.unsqueeze(-1) >= search).sum(-1, keepdim=True)

    # One gather fetches both ends of the bin for the x knots, y knots and derivatives.
    table = torch.cat(
        [_with_ends(interior, -bound, bound), _with_ends(interior_derivatives, 1.0, 1.0).unsqueeze(-2)], dim=-2
    )  # (..., 3, K+1)
    ends = torch.cat([index, index + 1], dim=-1).unsqueeze(-2).expand(*index.shape[:-1], 3, 2)
    (x_k, x_k1), (y_k, y_k1), (d_k, d_k1) = (t.unbind(-1) for t in torch.gather(table, -1, ends).unbind(-2))
    w, h = x_k1 - x_k, y_k1 - y_k
    slope = h / w
    curvature = d_k1 + d_k - 2 * slope

    if inverse:
        offset = clamped - y_k
        a = h * (slope - d_k) + offset * curvature
        b = h * d_k - offset * curvature
        c = -slope * offset
        # Floor at the smallest normal number, not 0: sqrt's gradient at 0 is inf, and inf * 0 = NaN.
        discriminant = (b.square() - 4 * a * c).clamp_min(torch.finfo(inputs.dtype).tiny)
        xi = (2 * c / (-b - torch.sqrt(discriminant))).clamp(0, 1)
        spline_out = xi * w + x_k
    else:
        xi = ((clamped - x_k) / w).clamp(0, 1)
    one_minus = 1 - xi
    xi_one_minus = xi * one_minus
    denominator = slope + curvature * xi_one_minus
    if not inverse:
        spline_out = y_k + h * (slope * xi.square() + d_k * xi_one_minus) / denominator
    # One log of the whole ratio: slope, numerator and denominator are bounded away from 0 and inf
    # by the minimum bin size and derivative, so the product cannot under- or overflow.
    numerator = d_k1 * xi.square() + 2 * slope * xi_one_minus + d_k * one_minus.square()
    log_derivative = torch.log(numerator * (slope / denominator).square())
    if inverse:
        log_derivative = -log_derivative
    outputs = torch.where(inside, spline_out, inputs)
    return outputs, torch.where(inside, log_derivative, 0.0)


#: The widest interval a spline may cover, [-bound, bound].
MAX_SPLINE_BOUND = 1e8


class RationalQuadraticSpline(ElementwiseTransformer):
    r"""Elementwise monotone rational-quadratic spline with ``bins`` bins on ``[-bound, bound]``.

    Parameters per feature: ``3 * bins - 1`` (widths, heights, interior derivatives). A zero
    parameter vector is the identity map (uniform bins, unit derivatives).

    >>> import torch
    >>> spline = RationalQuadraticSpline(bins=4, bound=2.0)
    >>> x = torch.linspace(-3, 3, 7).reshape(1, 7)
    >>> y, logdet = spline(x, torch.zeros(1, 7, spline.params_per_feature))
    >>> torch.allclose(y, x), torch.allclose(logdet, torch.zeros(1, 7), atol=1e-6)
    (True, True)
    """

    def __init__(self, bins: int = 8, bound: float = 5.0) -> None:
        super().__init__()
        bins = check_count("bins", bins, low=2)
        if bins * MIN_BIN_SIZE >= 1:
            raise ValueError(
                f"bins must be an int in 2..{round(1 / MIN_BIN_SIZE) - 1} (minimum bin size), got {bins!r}"
            )
        self.bins = bins
        bound = check_real("bound", bound)
        if not 0 < bound <= MAX_SPLINE_BOUND:
            raise ValueError(
                f"bound must be in (0, {MAX_SPLINE_BOUND:g}] (knots and slopes finite in float32), got {bound!r}"
            )
        self.bound = bound
        self.params_per_feature = 3 * bins - 1

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        k = self.bins
        return params[..., : 2 * k].unflatten(-1, (2, k)), params[..., 2 * k :]

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return _spline(x, *self._split(params), self.bound, inverse=False)

    def inverse(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return _spline(z, *self._split(params), self.bound, inverse=True)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound}"
