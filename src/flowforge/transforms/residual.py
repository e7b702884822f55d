r"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019; Residual Flows, Chen et al. 2019).

A block maps data to noise by :math:`z = x + g(x)` where :math:`g` is a contraction,
:math:`\mathrm{Lip}(g) \le c < 1`. Then:

* **Invertible.** :math:`x = z - g(x)` is a fixed point of a contraction, so the iteration
  :math:`x_{k+1} = z - g(x_k)` converges to it from any start (Banach), with error
  :math:`\le c^k/(1-c)\,\|x_1 - x_0\|`.
* **Log-determinant as a power series.** The eigenvalues of :math:`J_g` lie in the unit disc, so

  .. math:: \log\det(I + J_g) = \sum_{k\ge1} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J_g^k),

  estimated without bias by a Russian-roulette truncation of the series and Hutchinson's trace
  :math:`\operatorname{tr}(A) = \mathbb E[v^\top A v]`: each :math:`v^\top J_g^k` is one
  vector-Jacobian product more.
* **Neumann-series gradient.** Differentiating the series term by term gives
  :math:`\partial_\theta \log\det(I + J_g) = \sum_{k\ge0} (-1)^k \operatorname{tr}(J_g^k\,\partial_\theta J_g)`.
  The block evaluates the vectors :math:`v^\top J_g^k` without a graph, then backpropagates once
  through :math:`w^\top J_g v` with :math:`w = \sum_k (-1)^k v^\top J_g^k / P(N > k)`: memory of
  one vector-Jacobian product, not of all :math:`N`.

The contraction comes from :class:`LipschitzLinear` layers (spectral normalisation by power
iteration, rescaled to at most ``coefficient``) and 1-Lipschitz activations (:class:`LipSwish`).
For small dimensions, ``logdet="exact"`` computes :math:`\log|\det(I + J_g)|` from the full
Jacobian instead: deterministic, used by the tests as the reference.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. Invertible Residual Networks. ICML 2019.
    Chen, Behrmann, Duvenaud, Jacobsen. Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.ode.divergence import roulette_weights
from flowforge.transforms.base import Transform
from flowforge.validation import check_autograd_available, check_count, check_real, check_widths


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-12)


class LipschitzLinear(nn.Module):
    r"""A linear layer whose weight is rescaled to spectral norm at most ``coefficient``.

    .. math:: \tilde W = W / \max(1, \hat\sigma / c), \qquad \hat\sigma = u^\top W v,

    where :math:`u, v` are the leading singular vectors of :math:`W`, found by power iteration
    and kept in buffers (so a checkpoint carries them). The iteration runs, warm-started from the
    last vectors, whenever the weight has changed since it last ran (after each optimizer step),
    until :math:`\hat\sigma` changes by less than a relative ``tolerance``; between weight
    changes the layer is one fixed function, in training and eval mode alike, so a forward pass
    and a fixed-point inverse see the same map. :math:`\hat\sigma` carries a gradient, as in
    spectral normalisation of GANs. A change is seen through the tensor's version counter, which
    every in-place operation on the parameter (optimizers, ``load_state_dict``, ``copy_`` under
    ``no_grad``) advances; writes through ``weight.data`` do not, so after those call
    :meth:`refresh`.

    Arguments:
        in_features, out_features: sizes of the map.
        coefficient: the bound :math:`c` on the spectral norm, in (0, 1] for contractions.
        max_power_iterations: cap on the power-iteration steps after one weight change.
        tolerance: relative change of :math:`\hat\sigma` that ends the iteration; ``None``
            picks 1e-5 in float32 and 1e-10 in float64.

    >>> import torch
    >>> layer = LipschitzLinear(8, 8, coefficient=0.9)
    >>> with torch.no_grad():
    ...     _ = layer.weight.mul_(10.0)
    >>> float(torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2)) <= 0.9 * (1 + 1e-4)
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coefficient: float = 0.97,
        max_power_iterations: int = 500,
        tolerance: float | None = None,
    ) -> None:
        super().__init__()
        in_features = check_count("in_features", in_features)
        out_features = check_count("out_features", out_features)
        coefficient = check_real("coefficient", coefficient)
        if not 0.0 < coefficient <= 1.0:
            raise ValueError(f"coefficient must be in (0, 1], got {coefficient}")
        max_power_iterations = check_count("max_power_iterations", max_power_iterations)
        tolerance = check_real("tolerance", tolerance, positive=True, optional=True)
        self.in_features, self.out_features = in_features, out_features
        self.coefficient = float(coefficient)
        self.max_power_iterations = max_power_iterations
        self.tolerance = tolerance
        layer = nn.Linear(in_features, out_features)  # PyTorch's default initialisation
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("left_vector", _unit(torch.randn(out_features)))
        self.register_buffer("right_vector", _unit(torch.randn(in_features)))
        self._iterated_for: tuple | None = None  # the weight version the vectors belong to

    @torch.no_grad()
    def _power_iterate(self) -> None:
        weight = self.weight.detach()
        tolerance = self.tolerance or (1e-10 if weight.dtype == torch.float64 else 1e-5)
        u, v = self.left_vector, self.right_vector
        sigma = float(u @ weight @ v)
        for _ in range(self.max_power_iterations):
            v_next = _unit(weight.T @ u)
            u_next = _unit(weight @ v_next)
            previous, sigma = sigma, float(u_next @ weight @ v_next)
            if abs(sigma - previous) <= tolerance * abs(sigma):
                # Keep the vectors that already gave this estimate: iterating again from them (after a
                # reload, a copy, a refresh) is then a no-op, and a saved model reloads exactly.
                break
            u, v = u_next, v_next
        self.left_vector.copy_(u)
        self.right_vector.copy_(v)

    def refresh(self) -> None:
        """Run the power iteration now (after writing the weight through ``.data``)."""
        self._iterated_for = None

    def spectral_norm_estimate(self) -> Tensor:
        """:math:`\\hat\\sigma = u^\top W v` after bringing :math:`u, v` up to date with the weight."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._iterated_for != key:
            self._power_iterate()
            self._iterated_for = key
        return self.left_vector @ self.weight @ self.right_vector

    def normalized_weight(self) -> Tensor:
        """The rescaled weight :math:`\tilde W`."""
        return self.weight / (self.spectral_norm_estimate() / self.coefficient).clamp_min(1.0)

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.linear(x, self.normalized_weight() if weight is None else weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, coefficient={self.coefficient}"


class LipSwish(nn.Module):
    r"""The 1-Lipschitz activation :math:`x \mapsto x\,\sigma(\beta x) / 1.1` (Chen et al. 2019),
    with :math:`\beta = \mathrm{softplus}(\tilde\beta)` learnable per unit.

    The slope of :math:`x\sigma(\beta x)` never exceeds 1.0998 for any :math:`\beta > 0`, hence
    the division by 1.1. Unlike ReLU or ELU its derivative is smooth, which the log-det series
    and its gradient need.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.full((features,), 0.5413))  # softplus -> 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * F.softplus(self.raw_beta)) / 1.1


class LipschitzMLP(nn.Module):
    r"""The residual branch :math:`g(x, c)`: :class:`LipschitzLinear` layers and :class:`LipSwish`.

    Its Lipschitz constant in :math:`x` is at most ``coefficient`` to the power of the number of
    layers. A context enters the first layer through an unconstrained linear map, which shifts
    the pre-activations and leaves the bound in :math:`x` as it is.
    """

    def __init__(
        self, features: int, context: int = 0, hidden: Sequence[int] = (64, 64), coefficient: float = 0.97
    ) -> None:
        super().__init__()
        widths = [features, *hidden, features]
        self.layers = nn.ModuleList(LipschitzLinear(a, b, coefficient) for a, b in pairwise(widths))
        self.activations = nn.ModuleList(LipSwish(w) for w in hidden)
        self.context_layer = nn.Linear(context, widths[1], bias=False) if context > 0 else None

    def normalized_weights(self) -> list[Tensor]:
        """Every layer's rescaled weight, to be passed to :meth:`forward` for repeated calls."""
        return [layer.normalized_weight() for layer in self.layers]

    def forward(self, x: Tensor, context: Tensor | None = None, weights: Sequence[Tensor] | None = None) -> Tensor:
        weights = self.normalized_weights() if weights is None else weights
        h = self.layers[0](x, weights[0])
        if self.context_layer is not None:
            h = h + self.context_layer(context)
        for activation, layer, weight in zip(self.activations, self.layers[1:], weights[1:], strict=True):
            h = layer(activation(h), weight)
        return h


class ResidualBlock(Transform):
    r"""An invertible residual block :math:`z = x + g(x, c)` with :math:`\mathrm{Lip}_x(g) < 1`.

    Arguments:
        features: size of the vector ``(batch, features)``.
        context: size of the context vector (0 for an unconditional block).
        hidden: hidden widths of :math:`g` (a :class:`LipschitzMLP`).
        coefficient: spectral-norm bound of each layer of :math:`g`, in (0, 1).
        logdet: ``"series"`` (unbiased Russian-roulette power series with Hutchinson's trace and
            the Neumann gradient) or ``"exact"`` (full Jacobian and a determinant; small
            ``features`` only: it costs ``features`` backward passes).
        min_terms: series terms always computed in training mode; beyond them the count is
            geometric with stopping probability ``stop_probability``.
        eval_min_terms: the same in eval mode, where a lower variance is worth more terms.
        inverse_tolerance: the fixed-point iteration stops when no coordinate moved by more than
            ``inverse_tolerance * (1 + |x|)``; ``None`` picks 1e-6 in float32 and 1e-12 in float64.
        max_iterations: iterations allowed before the inverse warns that it did not converge.

    The log-determinant estimate of ``"series"`` is random (one probe and one roulette draw per
    call); its expectation is exact. :meth:`inverse` returns minus the estimate at the
    recovered ``x``.

    >>> import torch
    >>> block = ResidualBlock(3, logdet="exact")
    >>> x = torch.randn(5, 3)
    >>> z, ladj = block(x)
    >>> torch.allclose(block.inverse(z)[0], x, atol=1e-5), ladj.shape
    (True, torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        coefficient: float = 0.97,
        logdet: str = "series",
        min_terms: int = 2,
        eval_min_terms: int = 10,
        stop_probability: float = 0.5,
        inverse_tolerance: float | None = None,
        max_iterations: int = 2000,
    ) -> None:
        super().__init__()
        features = check_count("features", features)
        context = check_count("context", context, low=0)
        hidden = check_widths("hidden", hidden)
        coefficient = check_real("coefficient", coefficient)
        if not 0.0 < coefficient < 1.0:
            raise ValueError(f"coefficient must be in (0, 1) for g to be a contraction, got {coefficient}")
        if logdet not in ("series", "exact"):
            raise ValueError(f"logdet must be 'series' or 'exact', got {logdet!r}")
        min_terms = check_count("min_terms", min_terms)
        eval_min_terms = check_count("eval_min_terms", eval_min_terms)
        stop_probability = check_real("stop_probability", stop_probability)
        if not 0.0 < stop_probability < 1.0:
            raise ValueError(f"stop_probability must be in (0, 1), got {stop_probability}")
        inverse_tolerance = check_real("inverse_tolerance", inverse_tolerance, positive=True, optional=True)
        max_iterations = check_count("max_iterations", max_iterations)
        self.features = features
        self.context_features = int(context)
        self.coefficient = float(coefficient)
        self.logdet = logdet
        self.min_terms, self.eval_min_terms = min_terms, eval_min_terms
        self.stop_probability = stop_probability
        self.inverse_tolerance = inverse_tolerance
        self.max_iterations = max_iterations
        self.residual = LipschitzMLP(features, context, hidden, coefficient)
        #: fixed-point iterations used by the last :meth:`inverse` call.
        self.last_iterations = 0

    # -- log-determinant ----------------------------------------------------------------------
    def _logdet_exact(self, x: Tensor, gx: Tensor, create_graph: bool) -> Tensor:
        eye = torch.eye(self.features, dtype=x.dtype, device=x.device)
        basis = eye[:, None, :].expand(self.features, *x.shape)
        (rows,) = torch.autograd.grad(gx, x, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True)
        jacobian = rows.permute(1, 0, 2)  # (batch, out, in)
        return torch.linalg.slogdet(eye + jacobian).logabsdet

    def _logdet_series(self, x: Tensor, gx: Tensor, create_graph: bool) -> Tensor:
        min_terms = self.min_terms if self.training else self.eval_min_terms
        weights = roulette_weights(self.stop_probability, min_terms)
        probe = torch.randn_like(x)
        power = probe  # v^T J^k, one vector-Jacobian product per term, no graph
        estimate = x.new_zeros(x.shape[0])
        neumann = torch.zeros_like(x)  # sum_k (-1)^k v^T J^k / P(N > k), for the gradient
        for k, weight in enumerate(weights, start=1):
            sign = 1.0 if k % 2 == 1 else -1.0
            if create_graph:
                neumann = neumann + (sign * weight) * power
            (power,) = torch.autograd.grad(gx, x, power, retain_graph=True)
            estimate = estimate + (sign * weight / k) * (power * probe).sum(1)
        if not create_graph:
            return estimate
        (surrogate,) = torch.autograd.grad(gx, x, neumann, create_graph=True)
        surrogate = (surrogate * probe).sum(1)
        # The value of the unbiased estimate, the gradient of the Neumann series.
        return estimate + surrogate - surrogate.detach()

    def _residual_and_logdet(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        create_graph = torch.is_grad_enabled()
        check_autograd_available("a residual block's log-determinant (vector-Jacobian products of its branch)")
        with torch.enable_grad():
            # A fresh node to differentiate against, so that the series' vector-Jacobian products
            # stop here and never run hooks placed upstream (see _attach_implicit_gradient).
            x = x.clone() if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.residual(x, context)
            if self.logdet == "exact":
                logdet = self._logdet_exact(x, gx, create_graph)
            else:
                logdet = self._logdet_series(x, gx, create_graph)
        if not create_graph:
            return gx.detach(), logdet.detach()
        return gx, logdet

    # -- directions ---------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, context)
        gx, logdet = self._residual_and_logdet(x, context)
        return x + gx, logdet

    def _tolerance(self, dtype: torch.dtype) -> float:
        if self.inverse_tolerance is not None:
            return self.inverse_tolerance
        return 1e-12 if dtype == torch.float64 else 1e-6

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.inverse_without_logdet(z, context)
        _, logdet = self._residual_and_logdet(x, context)
        return x, -logdet

    def inverse_without_logdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """The fixed-point inverse alone (sampling skips the series log-determinant)."""
        self.check_input("z", z, context)
        if z.shape[0] == 0:
            self.last_iterations = 0
            return z
        tolerance = self._tolerance(z.dtype)
        with torch.no_grad():
            weights = self.residual.normalized_weights()  # the same g at every iteration
            x = z.detach()
            self.last_iterations = 0
            while True:
                x_next = z.detach() - self.residual(x, context, weights)
                change = float(((x_next - x).abs() / (1.0 + x_next.abs())).max())
                x = x_next
                self.last_iterations += 1
                if change <= tolerance:
                    break
                if self.last_iterations >= self.max_iterations:
                    warnings.warn(
                        f"ResidualBlock.inverse: fixed-point iteration stopped after {self.max_iterations} steps "
                        f"at relative change {change:.2e} > {tolerance:.0e}; raise max_iterations",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    break
        if torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in self.parameters())):
            x = self._attach_implicit_gradient(x, z, context)
        return x

    def _attach_implicit_gradient(self, x_star: Tensor, z: Tensor, context: Tensor | None) -> Tensor:
        r"""``x_star`` with the exact gradient of the fixed point (implicit function theorem).

        ``x = z - g(x)`` gives :math:`dx = (I + J_g)^{-1}(dz - \partial_\theta g\, d\theta)`. One
        graph step :math:`x = z - g(x^*)` from the (detached) fixed point has the right value and
        the right partial derivatives in :math:`z` and :math:`\theta`; a hook on it replaces the
        incoming gradient :math:`a` by :math:`\lambda = (I + J_g^\top)^{-1} a`, itself the fixed
        point of :math:`\lambda = a - J_g^\top \lambda` (a contraction too).
        """
        x_leaf = x_star.detach().requires_grad_(True)
        with torch.enable_grad():
            g_star = self.residual(x_leaf, context)
            x = z - g_star

        # The adjoint iteration contracts at the same rate as the forward one; twice its count
        # (plus a margin) squares the remaining error. A fixed count, not a data-dependent stop,
        # so the hook also works under vmap (batched Jacobians).
        iterations = min(2 * self.last_iterations + 10, self.max_iterations)

        def adjoint(grad: Tensor) -> Tensor:
            # Differentiates g_star, not x: a product through x would run this hook again.
            solution = grad
            for _ in range(iterations):
                (jt_solution,) = torch.autograd.grad(g_star, x_leaf, solution, retain_graph=True)
                solution = grad - jt_solution
            return solution

        x.register_hook(adjoint)
        return x

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context_features}, logdet={self.logdet!r}"


def lipschitz_bound(block: ResidualBlock) -> float:
    """The product of the layers' spectral norms (exact SVD): an upper bound on :math:`\\mathrm{Lip}_x(g)`."""
    with torch.no_grad():
        norms = [torch.linalg.matrix_norm(w.double(), ord=2) for w in block.residual.normalized_weights()]
    return math.prod(float(n) for n in norms)
