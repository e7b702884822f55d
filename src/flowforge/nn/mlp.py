"""Multi-layer perceptrons used as conditioners and context embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from torch import nn

from flowforge.validation import check_activation, check_count, check_dropout


class MLP(nn.Sequential):
    """``Linear -> activation -> ... -> Linear`` with the given hidden widths.

    Arguments:
        in_features: input size.
        out_features: output size.
        hidden: widths of the hidden layers (may be empty for a single linear map).
        activation: constructor of the activation module placed after each hidden layer.
        zero_init_output: start the last layer at zero, so that a conditioner built on it
            makes its transform the identity at initialisation (stable deep stacks).
        dropout: probability of :class:`torch.nn.Dropout` after each hidden activation (training
            mode only; 0: no dropout layers, so the layer indices are those of a plain MLP).

    >>> import torch
    >>> net = MLP(3, 2, hidden=(16, 16))
    >>> net(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init_output: bool = False,
        dropout: float = 0.0,
    ) -> None:
        activation = check_activation("activation", activation)
        dropout = check_dropout("dropout", dropout)
        if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden must be a sequence of layer widths, e.g. (64, 64), got {hidden!r}")
        widths = [
            check_count("in_features", in_features),
            *(check_count(f"hidden[{i}]", h) for i, h in enumerate(hidden)),
            check_count("out_features", out_features),
        ]
        if dropout and len(widths) < 3:
            raise ValueError(f"dropout = {dropout}: dropout acts after hidden layers, and hidden is empty")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(widths)):
            if i > 0:
                layers.append(activation())
                if dropout:
                    layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
        self.in_features = widths[0]
        self.out_features = widths[-1]
        if zero_init_output:
            last = layers[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
