r"""Invertible linear maps with cheap determinants and inverses.

:class:`LULinear` keeps its weight factorised as :math:`W = P L U` (Kingma & Dhariwal 2018,
section 3.2): a fixed permutation :math:`P`, a unit lower-triangular :math:`L` and an upper-triangular
:math:`U` with a positive diagonal. Then

.. math::
    \log|\det W| = \sum_i \log U_{ii} \quad (O(d)), \qquad
    W^{-1} v = U^{-1} L^{-1} P^\top v \quad \text{(two triangular solves, } O(d^2) \text{ per row)},

and every :math:`W` of this form is invertible, whatever an optimizer does to the parameters.

References:
    Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.transforms.base import Transform
from flowforge.validation import check_count, check_real


def _inverse_softplus(y: Tensor) -> Tensor:
    """The ``u`` with ``softplus(u) = y`` for ``y > 0``: ``log(expm1(y))``, written stably."""
    return y + torch.log(-torch.expm1(-y))


class LULinear(Transform):
    r"""Invertible linear map :math:`z = W x + b` with :math:`W = P L U` (forward: data -> noise).

    .. math::
        z = P L U x + b, \qquad x = U^{-1} L^{-1} P^\top (z - b), \qquad
        \log|\det J_f| = \sum_i \log U_{ii},

    where :math:`U_{ii} = \mathrm{softplus}(\tilde u_i) + \delta > 0` with the floor
    :math:`\delta` = ``min_diagonal``, so :math:`|\det W| \ge \delta^d` always.

    The learnable parameters are ``bias`` (:math:`b`) and ``lu`` of shape ``(features, features)``,
    which packs both triangular factors in one matrix as LAPACK does: its strictly lower part is
    that of :math:`L` (whose diagonal is 1), its strictly upper part that of :math:`U`, and its
    diagonal holds the unconstrained :math:`\tilde u`. The permutation :math:`P` is a buffer,
    fixed at construction. Nothing derived from the parameters is cached, so the layer stays
    correct after every optimizer step; :meth:`weight` assembles :math:`W` for inspection.

    Arguments:
        features: size of the vector ``(batch, features)``.
        identity_init: start at :math:`W = I`, :math:`b = 0` (:math:`P = L = U = I`). Otherwise
            :math:`W` starts as a uniformly random rotation (as in Glow), factorised once with
            :func:`torch.linalg.lu`; :math:`P` keeps that factorisation's pivoting and the column
            signs are chosen so that :math:`U` has a positive diagonal.
        min_diagonal: the floor :math:`\delta` on the diagonal of :math:`U`, in (0, 1).

    The layer takes no context; a ``context`` argument is accepted and ignored.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = LULinear(3, identity_init=False)
    >>> x = torch.randn(4, 3)
    >>> z, ladj = layer(x)
    >>> torch.allclose(z, x @ layer.weight().T + layer.bias, atol=1e-6)
    True
    >>> torch.allclose(ladj, torch.linalg.slogdet(layer.weight()).logabsdet.expand(4), atol=1e-5)
    True
    >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5)
    True
    """

    def __init__(self, features: int, identity_init: bool = True, min_diagonal: float = 1e-3) -> None:
        super().__init__()
        features = check_count("features", features)
        if not isinstance(identity_init, bool):
            raise ValueError(f"identity_init must be a bool, got {identity_init!r}")
        min_diagonal = check_real("min_diagonal", min_diagonal)
        if not (0.0 < min_diagonal < 1.0):
            raise ValueError(f"min_diagonal must be in (0, 1), got {min_diagonal}")
        self.features = features
        self.min_diagonal = min_diagonal
        if identity_init:
            permutation = torch.arange(features)
            lower = torch.eye(features)
            upper = torch.eye(features)
        else:
            permutation, lower, upper = self._random_rotation_factors(features)
        diagonal = (upper.diagonal() - self.min_diagonal).clamp_min(self.min_diagonal)
        packed = lower.tril(-1) + upper.triu(1) + torch.diag(_inverse_softplus(diagonal))
        self.lu = nn.Parameter(packed)
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @staticmethod
    def _random_rotation_factors(features: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(perm, L, U)`` of a uniformly random rotation whose ``U`` has a positive diagonal."""
        q, r = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))
        q = q * r.diagonal().sign()  # uniform (Haar) over the orthogonal group
        p, lower, upper = torch.linalg.lu(q)
        # q diag(s) = P L (U diag(s)) is still orthogonal; s = sign(U_ii) makes its U's diagonal positive.
        upper = upper * upper.diagonal().sign()
        dtype = torch.get_default_dtype()
        return p.argmax(1), lower.to(dtype), upper.to(dtype)

    def diagonal(self) -> Tensor:
        """The positive diagonal of :math:`U`, shape ``(features,)``."""
        return F.softplus(self.lu.diagonal()) + self.min_diagonal

    def lower(self) -> Tensor:
        """:math:`L`, unit lower-triangular, shape ``(features, features)``."""
        return self.lu.tril(-1) + torch.eye(self.features, dtype=self.lu.dtype, device=self.lu.device)

    def upper(self) -> Tensor:
        """:math:`U`, upper-triangular with a positive diagonal, shape ``(features, features)``."""
        return self.lu.triu(1) + torch.diag(self.diagonal())

    def permutation_matrix(self) -> Tensor:
        """:math:`P`, with ``(P v)[i] = v[permutation[i]]``."""
        eye = torch.eye(self.features, dtype=self.lu.dtype, device=self.lu.device)
        return eye.index_select(0, self.permutation)

    def weight(self) -> Tensor:
        """:math:`W = P L U` assembled, for inspection (``forward`` never builds it)."""
        return self.permutation_matrix() @ self.lower() @ self.upper()

    def _logabsdet(self, batch: int) -> Tensor:
        return self.diagonal().log().sum().repeat(batch)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, None)
        # Rows are vectors, so W x for every row is x W^T = x U^T L^T P^T.
        y = x @ self.upper().T @ self.lower().T
        return y.index_select(1, self.permutation) + self.bias, self._logabsdet(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, None)
        y = (z - self.bias).index_select(1, self.inverse_permutation)  # rows of P^T (z - b)
        # Row-wise L w = y and U x = w, i.e. w L^T = y and x U^T = w.
        w = torch.linalg.solve_triangular(self.lower().T, y, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(self.upper().T, w, upper=False, left=False)
        return x, -self._logabsdet(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}, min_diagonal={self.min_diagonal}"


def _statistic(name: str, value: object) -> Tensor:
    """A statistic of :class:`Standardize` as a finite tensor of PyTorch's default dtype."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a vector of numbers (a tensor, array or list), got {value!r}") from error
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).flatten().nonzero()[0])
        raise ValueError(f"{name} must be finite, got {float(tensor.flatten()[bad])} at index {bad}")
    return tensor


class Standardize(Transform):
    r"""The fixed map :math:`z = (x - \mu) / s` with per-feature statistics of the training data.

    Placed first in a flow trained on standardized data, it makes ``log_prob`` a density in the
    data's own units (:math:`\log|\det J| = -\sum_i \log s_i`) and keeps the statistics in the
    model's weights (buffers), so a checkpoint carries them.

    >>> import torch
    >>> layer = Standardize(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    >>> z, ladj = layer(torch.tensor([[3.0, 6.0]]))
    >>> z.tolist(), round(float(ladj), 4)
    ([[1.0, 1.0]], -2.0794)
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        # in PyTorch's default dtype, as every layer's parameters are built (NumPy's statistics are float64)
        mean, std = (_statistic(name, value) for name, value in (("mean", mean), ("std", std)))
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must be vectors of one size, got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool((std > 0).all()):
            bad = int((~(std > 0)).nonzero()[0])
            raise ValueError(f"std must be positive in every feature, got {float(std[bad]):g} at index {bad}")
        self.features = mean.shape[0]
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, None)
        return (x - self.mean) / self.std, (-self.std.log().sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, None)
        return z * self.std + self.mean, self.std.log().sum().expand(z.shape[0])


class InvertibleConv1x1(Transform):
    r"""Glow's invertible 1x1 convolution: the same :class:`LULinear` map on every pixel's channels.

    .. math:: z_{:, h, w} = P L U\, x_{:, h, w} + b, \qquad \log|\det J_f| = H W \sum_i \log U_{ii}.

    Arguments:
        channels: channels of the image ``(batch, channels, H, W)``.
        identity_init: start at the identity instead of a random rotation (Glow's choice).

    >>> import torch
    >>> conv = InvertibleConv1x1(3)
    >>> x = torch.randn(2, 3, 4, 4)
    >>> z, ladj = conv(x)
    >>> torch.allclose(conv.inverse(z)[0], x, atol=1e-5), ladj.shape
    (True, torch.Size([2]))
    """

    def __init__(self, channels: int, identity_init: bool = False) -> None:
        super().__init__()
        self.channels = check_count("channels", channels)
        self.linear = LULinear(channels, identity_init=identity_init)

    def _check(self, name: str, value: Tensor) -> None:
        if not isinstance(value, Tensor) or value.dim() != 4 or value.shape[1] != self.channels:
            raise ValueError(
                f"{name} must have shape (batch, {self.channels}, H, W), got {tuple(getattr(value, 'shape', ()))}"
            )

    def _apply_rows(self, step, value: Tensor) -> Tensor:
        b, c, h, w = value.shape
        rows = value.permute(0, 2, 3, 1).reshape(-1, c)
        out, _ = step(rows)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def _logabsdet(self, value: Tensor) -> Tensor:
        pixels = value.shape[2] * value.shape[3]
        return (self.linear.diagonal().log().sum() * pixels).repeat(value.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("x", x)
        return self._apply_rows(self.linear.forward, x), self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("z", z)
        return self._apply_rows(self.linear.inverse, z), -self._logabsdet(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
