r"""Masked autoregressive transforms (MAF, Papamakarios et al. 2017; IAF, Kingma et al. 2016).

Each feature is transformed by an elementwise map whose parameters depend on the features
before it in a fixed order (and on the context):

.. math:: z_j = \tau\big(x_j;\ \theta_j(x_{<j}, c)\big), \qquad
          \log|\det J| = \sum_j \log\Big|\frac{\partial\tau}{\partial x_j}\Big|,

the Jacobian being triangular in that order. The parameters of all features come from one
:class:`~flowforge.nn.MADE` pass, so the data -> noise direction (density evaluation) costs one
network pass. The noise -> data direction must be solved one feature at a time; MADE's degree
layout lets it reuse every hidden unit once computed, so it costs one network pass in total
plus ``features`` small steps. ``Invert`` of this transform is an IAF: one pass to sample.

References:
    Germain, Gregor, Murray, Larochelle. MADE. ICML 2015.
    Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow for Density Estimation. NeurIPS 2017.
    Kingma et al. Improved Variational Inference with Inverse Autoregressive Flow. NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from flowforge.nn import MADE
from flowforge.transforms.base import Transform
from flowforge.transforms.elementwise import AffineElementwise, ElementwiseTransformer
from flowforge.validation import check_bool, check_count


class MaskedAutoregressive(Transform):
    """An autoregressive layer: a MADE conditioner and a pluggable elementwise transformer.

    Arguments:
        features: number of features.
        transformer: elementwise map (``AffineElementwise()``, ``AdditiveElementwise()``,
            ``RationalQuadraticSpline(bins, bound)``); defaults to a soft-clamped affine map.
        context: size of the context vector (0 for none).
        hidden: hidden widths of the MADE.
        residual: use masked residual blocks in the MADE.
        activation: activation constructor.
        order: autoregressive order (a permutation); natural order by default.

    >>> import torch
    >>> from flowforge.transforms import RationalQuadraticSpline
    >>> layer = MaskedAutoregressive(3, RationalQuadraticSpline(bins=4), context=2, hidden=(16,))
    >>> x, c = torch.randn(5, 3), torch.randn(5, 2)
    >>> z, ladj = layer(x, c)
    >>> torch.allclose(layer.inverse(z, c)[0], x, atol=1e-5), ladj.shape
    (True, torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        transformer: ElementwiseTransformer | None = None,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        order: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__()
        features = check_count("features", features)
        context = check_count("context", context, low=0)
        check_bool("residual", residual)
        if transformer is not None and not isinstance(transformer, ElementwiseTransformer):
            raise TypeError(
                f"transformer must be an ElementwiseTransformer (e.g. AffineElementwise()) or None, "
                f"got {type(transformer).__name__}"
            )
        self.transformer = AffineElementwise() if transformer is None else transformer
        self.features = features
        self.context_features = context
        self.made = MADE(features, self.transformer.params_per_feature, context, hidden, residual, activation, order)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, context)
        z, log_derivative = self.transformer(x, self.made(x, context if self.context_features else None))
        return z, log_derivative.sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, context)
        return self.made.autoregressive_inverse(z, context if self.context_features else None, self.transformer.inverse)

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context_features}"
