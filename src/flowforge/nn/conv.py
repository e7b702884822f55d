"""Small convolutional networks: conditioners of image coupling layers and multi-scale priors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowforge.validation import check_count


class ConvConditioner(nn.Module):
    """``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` (Glow's coupling network), last layer zero.

    A context vector, when given, is broadcast over the image as extra input channels, so each
    layer sees the condition at every pixel.

    Arguments:
        in_channels: channels of the image input.
        out_channels: channels of the output.
        hidden_channels: channels of the two hidden layers.
        context: size of the context vector (0: none; a context given to such a net is not read,
            as layers of a conditional stack pass theirs to every layer).

    >>> import torch
    >>> net = ConvConditioner(2, 4, hidden_channels=8, context=3)
    >>> net(torch.randn(5, 2, 4, 4), torch.randn(5, 3)).shape
    torch.Size([5, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, context: int = 0) -> None:
        super().__init__()
        in_channels = check_count("in_channels", in_channels)
        out_channels = check_count("out_channels", out_channels)
        hidden_channels = check_count("hidden_channels", hidden_channels)
        self.context_features = context = check_count("context", context, low=0)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + context, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
        )
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features > 0:
            if context is None:
                raise ValueError(
                    f"this net is conditional: context of shape (batch, {self.context_features}) is required"
                )
            planes = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        return self.net(x)
