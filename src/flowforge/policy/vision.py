r"""The policy's image pipeline: augmentation, the two image encoders and spatial-softmax keypoints.

**Augmentation** (:class:`ImageAugmentation`), applied on the fly to every training batch (a
policy's ``loss`` in training mode) and never in evaluation (``predict_chunk`` and ``log_prob``
never augment, whatever the mode):

* ``"shift"`` (DrQ, Kostrikov et al. 2021): the image moves by up to ``pixels`` in each direction,
  the border pixels repeated (DrQ pads by repetition and crops back to the original size); the
  encoder sees the whole frame, unmoved, in evaluation;
* ``"crop"`` (Diffusion Policy, Chi et al. 2023): a window of ``(H - 2 pixels, W - 2 pixels)`` at a
  random place in training, the centre window in evaluation;
* colour jitter (``color_jitter = s``): brightness, contrast and saturation each scaled by a factor
  drawn from :math:`[1 - s, 1 + s]`.

One draw per observation window: the frames of a window (``obs_horizon`` of them) move together, so
that what changes between them is the scene, not the augmentation. :meth:`ImageAugmentation.eval_view`
is what evaluation sees, and what a data set's image statistics are computed on
(:func:`image_statistics`), so training, evaluation and the statistics agree on the pixels.

**Encoders**, from a float image to tokens of the model width:

* ``"conv"`` (:class:`ImageEncoder`): three convolutions trained from scratch, one token per cell
  of the last grid (84x84 -> 7x7 = 49 tokens);
* ``"resnet-keypoints"`` (:class:`KeypointImageEncoder`), Diffusion Policy's encoder sized for a CPU:
  residual stages of 3x3 convolutions with GroupNorm (a stride-2 convolution, then one residual
  block), a 1x1 convolution to :math:`K` feature maps and a :class:`SpatialSoftmax` that turns
  each map into the expected image position of its activation, a *keypoint* :math:`(x, y)`
  (Levine et al. 2016); each keypoint becomes one token. A 76x76 crop with channels (16, 32, 64)
  costs about 7 million multiply-adds, a little less than the conv encoder's 9 million at 84x84.

>>> import torch
>>> augment = ImageAugmentation("crop", pixels=4)
>>> images = torch.randint(0, 256, (6, 3, 84, 84), dtype=torch.uint8)
>>> augment(images, frames=2).shape, augment.eval().eval_view(images).shape
(torch.Size([6, 3, 76, 76]), torch.Size([6, 3, 76, 76]))
>>> encoder = KeypointImageEncoder([3, 76, 76], width=32, keypoints=8)
>>> encoder(torch.zeros(6, 3, 76, 76)).shape
torch.Size([6, 8, 32])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.data.feature_stats import image_stats
from flowforge.validation import check_count

#: Image augmentations (``policy.augmentation``).
AUGMENTATIONS = ("none", "shift", "crop")
#: Image encoders (``policy.image_encoder``).
IMAGE_ENCODERS = ("conv", "resnet-keypoints")
#: The smallest image side the conv encoder takes (its three layers need 36 pixels).
MIN_IMAGE_SIZE = 36
#: Per-channel weights of luminance (ITU-R BT.601), for contrast and saturation.
_LUMA = (0.299, 0.587, 0.114)


def min_image_size(encoder: str, stages: int = 3) -> int:
    """The smallest image side ``encoder`` takes: 36 for ``"conv"``; for ``"resnet-keypoints"`` with
    ``stages`` stages (the image halved ``stages + 1`` times, rounding up), a last grid of at least
    2x2: ``2 ** (stages + 1) + 1`` pixels."""
    if encoder == "conv":
        return MIN_IMAGE_SIZE
    return 2 ** (stages + 1) + 1


def _windows(images: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """The ``(height, width)`` windows of ``images`` (N, C, H, W) starting at rows ``top`` and columns
    ``left`` (N,), which may reach past the border: indices are clamped there, which repeats the
    border pixels (DrQ's replicate padding). Works for every dtype (uint8 too) and is differentiable."""
    rows = (top[:, None] + torch.arange(height, device=images.device)).clamp(0, images.shape[-2] - 1)
    cols = (left[:, None] + torch.arange(width, device=images.device)).clamp(0, images.shape[-1] - 1)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    # Advanced indices around a slice: the result is (N, height, width, C).
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class ImageAugmentation(nn.Module):
    """Random shift or crop and colour jitter of training images (see the module docstring).

    Arguments:
        mode: ``"none"``, ``"shift"`` or ``"crop"``.
        pixels: the largest shift in each direction (``"shift"``), or half of what the crop removes
            from each side (``"crop"``: the window is ``(H - 2 pixels, W - 2 pixels)``).
        color_jitter: strength :math:`s` in [0, 1) of the brightness, contrast and saturation jitter.

    It has no parameters: a policy's checkpoint is the same with or without it.
    """

    def __init__(self, mode: str = "none", pixels: int = 4, color_jitter: float = 0.0) -> None:
        super().__init__()
        if mode not in AUGMENTATIONS:
            raise ValueError(f"augmentation {mode!r} is not one of {', '.join(AUGMENTATIONS)}")
        pixels = check_count("pixels", pixels, low=0)
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter = {color_jitter!r}: expected a number in [0, 1)")
        self.mode, self.pixels, self.color_jitter = mode, pixels, float(color_jitter)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The size of what the encoder sees for ``(height, width)`` images."""
        if self.mode == "crop":
            return height - 2 * self.pixels, width - 2 * self.pixels
        return height, width

    def active(self, augment: bool | None = None) -> bool:
        """Whether to augment now: ``augment``, or in training mode when ``None``."""
        return self.training if augment is None else augment

    def jitters(self, augment: bool | None = None) -> bool:
        """Whether images get colour jitter now (augmenting, with ``color_jitter > 0``)."""
        return self.active(augment) and self.color_jitter > 0

    def eval_view(self, images: Tensor) -> Tensor:
        """What evaluation sees of ``images`` (N, C, H, W): the centre window for ``"crop"``, else the images."""
        if self.mode != "crop" or self.pixels == 0:
            return images
        p = self.pixels
        return images[..., p : images.shape[-2] - p, p : images.shape[-1] - p]

    def geometric(self, images: Tensor, frames: int = 1, augment: bool | None = None) -> Tensor:
        """The shifted or cropped ``images`` (N, C, H, W), any dtype; ``N = rows * frames``, the
        ``frames`` consecutive images of a row moved alike. Not augmenting (``augment``, or the
        module's mode when ``None``): :meth:`eval_view`."""
        if not self.active(augment) or self.mode == "none" or self.pixels == 0:
            return self.eval_view(images)
        rows = _rows(images, frames)
        p = self.pixels
        low, high = (-p, p) if self.mode == "shift" else (0, 2 * p)
        top = torch.randint(low, high + 1, (rows,), device=images.device).repeat_interleave(frames)
        left = torch.randint(low, high + 1, (rows,), device=images.device).repeat_interleave(frames)
        height, width = self.output_size(*images.shape[-2:])
        return _windows(images, top, left, height, width)

    def color(self, images: Tensor, frames: int = 1, augment: bool | None = None) -> Tensor:
        """Colour jitter of float ``images`` (N, 3, H, W) in [0, 1] (when augmenting; the images else)."""
        if not self.jitters(augment):
            return images
        rows = _rows(images, frames)
        s = self.color_jitter

        def factor() -> Tensor:
            draw = torch.empty(rows, 1, 1, 1, device=images.device).uniform_(1 - s, 1 + s)
            return draw.repeat_interleave(frames, dim=0).to(images.dtype)

        luma = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        x = images * factor()  # brightness
        mean = (x * luma).sum(1, keepdim=True).mean((-2, -1), keepdim=True)
        x = (x - mean) * factor() + mean  # contrast
        gray = (x * luma).sum(1, keepdim=True)
        x = (x - gray) * factor() + gray  # saturation
        return x.clamp(0, 1)

    def forward(self, images: Tensor, frames: int = 1, augment: bool | None = None) -> Tensor:
        """``images`` (N, 3, H, W) uint8 to the augmented float images in [0, 1] (:meth:`geometric`,
        then :meth:`color`)."""
        x = self.geometric(images, frames, augment)
        return self.color((x if x.is_floating_point() else x.float()) / 255.0, frames, augment)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pixels={self.pixels}, color_jitter={self.color_jitter}"


def _rows(images: Tensor, frames: int) -> int:
    if images.shape[0] % frames:
        raise ValueError(f"{images.shape[0]} images are not whole windows of {frames} frames")
    return images.shape[0] // frames


def image_statistics(frames: Tensor | np.ndarray, augmentation: ImageAugmentation) -> dict[str, Any]:
    """Per-channel ``mean`` and ``std`` (each (3, 1, 1), pixels in [0, 1]) of uint8 ``frames``
    (N, 3, H, W), over the view evaluation gives the encoder (:meth:`ImageAugmentation.eval_view`),
    the statistics a policy with ``image_normalization = "mean_std"`` standardises its pixels with."""
    view = augmentation.eval_view(torch.as_tensor(frames))
    return image_stats(view.permute(0, 2, 3, 1).numpy())


class ImageEncoder(nn.Module):
    """Conv net trained from scratch: an image (3, 84, 84) to a 7x7 grid of tokens.

    ``conv 8x8 /4 -> GELU -> conv 4x4 /2 -> GELU -> conv 3x3 -> tokens``; other sizes give other
    grids. Takes pixels already scaled (:class:`~flowforge.policy.encoders.ObservationEncoder` does it).
    """

    def __init__(self, image_shape: Sequence[int], width: int) -> None:
        """``image_shape``: ``[3, H, W]`` with H, W >= :data:`MIN_IMAGE_SIZE` (``PolicyConfig`` checks it)."""
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 8, stride=4),
            nn.GELU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.GELU(),
            nn.Conv2d(64, width, 3),
        )
        with torch.no_grad():
            self.tokens = int(self.net(torch.zeros(1, *image_shape)).flatten(2).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float to ``(B, tokens, width)``."""
        return self.net(images).flatten(2).transpose(1, 2)


class SpatialSoftmax(nn.Module):
    r"""Feature maps to keypoints: the expected position of each map's softmax.

    For a map :math:`f` of size :math:`h \times w`, :math:`p_{ij} = \mathrm{softmax}(f / T)_{ij}` over
    all cells and the keypoint is :math:`(\sum p_{ij} x_j, \sum p_{ij} y_i)`, with :math:`x` and
    :math:`y` evenly spaced from -1 (left, top) to 1 (right, bottom). The temperature :math:`T` is learned
    (starting at ``temperature``).

    >>> maps = torch.zeros(1, 1, 3, 5)
    >>> maps[0, 0, 2, 4] = 1e4  # all the mass at the bottom-right cell
    >>> SpatialSoftmax()(maps)
    tensor([[[1., 1.]]], grad_fn=<StackBackward0>)
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, maps: Tensor) -> Tensor:
        """``(N, K, h, w)`` to keypoints ``(N, K, 2)``, (x, y) each in [-1, 1]."""
        height, width = maps.shape[-2:]
        weights = torch.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1).view_as(maps)
        x = torch.linspace(-1, 1, width, dtype=maps.dtype, device=maps.device)
        y = torch.linspace(-1, 1, height, dtype=maps.dtype, device=maps.device)
        return torch.stack([(weights.sum(-2) * x).sum(-1), (weights.sum(-1) * y).sum(-1)], dim=-1)


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide the channels, else the largest divisor below 8."""
    return max(g for g in range(1, 9) if channels % g == 0)


class ResidualBlock(nn.Module):
    """``x + GN(conv(GELU(GN(conv(x)))))`` then GELU: two 3x3 convolutions with GroupNorm, the size kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )
        self.activation = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(x + self.body(x))


class KeypointImageEncoder(nn.Module):
    """Residual conv stages with GroupNorm and spatial-softmax keypoints: an image to ``keypoints`` tokens.

    A ResNet's layout, narrow: a stem (a stride-2 3x3 convolution to ``channels[0]``, GroupNorm,
    GELU, a stride-2 3x3 max pool: a quarter of the size), then one stage per entry of ``channels``,
    each a :class:`ResidualBlock`, every stage after the first preceded by a stride-2 3x3
    convolution to its channels with GroupNorm and GELU (76x76 -> 19x19 -> 10x10 -> 5x5). A 1x1
    convolution makes ``keypoints`` maps of the last grid, :class:`SpatialSoftmax` their positions,
    and a linear layer each position's token (the learned prefix positions of
    :class:`~flowforge.policy.encoders.ObservationEncoder` tell the keypoints apart).
    """

    def __init__(
        self, image_shape: Sequence[int], width: int, keypoints: int = 32, channels: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(_groups(channels[0]), channels[0]),
            nn.GELU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        previous = channels[0]
        for stage, size in enumerate(channels):
            if stage > 0:
                layers += [
                    nn.Conv2d(previous, size, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(_groups(size), size),
                    nn.GELU(),
                ]
            layers.append(ResidualBlock(size))
            previous = size
        self.backbone = nn.Sequential(*layers)
        self.keypoint_maps = nn.Conv2d(previous, keypoints, 1)
        self.spatial_softmax = SpatialSoftmax()
        self.project = nn.Linear(2, width)
        self.tokens = keypoints
        self.grid = tuple(int(s) for s in self.backbone(torch.zeros(1, *image_shape)).shape[-2:])

    def keypoints(self, images: Tensor) -> Tensor:
        """The keypoints ``(B, K, 2)`` of float ``images`` (B, 3, H, W)."""
        return self.spatial_softmax(self.keypoint_maps(self.backbone(images)))

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float to ``(B, keypoints, width)``."""
        return self.project(self.keypoints(images))


def build_image_encoder(
    kind: str, image_shape: Sequence[int], width: int, keypoints: int = 32, channels: Sequence[int] = (16, 32, 64)
) -> nn.Module:
    """The image encoder ``kind`` (:data:`IMAGE_ENCODERS`) for images of ``image_shape`` (what it sees)."""
    if kind == "conv":
        return ImageEncoder(image_shape, width)
    if kind == "resnet-keypoints":
        return KeypointImageEncoder(image_shape, width, keypoints, channels)
    raise ValueError(f"image encoder {kind!r} is not one of {', '.join(IMAGE_ENCODERS)}")


__all__ = [
    "AUGMENTATIONS",
    "IMAGE_ENCODERS",
    "MIN_IMAGE_SIZE",
    "ImageAugmentation",
    "ImageEncoder",
    "KeypointImageEncoder",
    "ResidualBlock",
    "SpatialSoftmax",
    "build_image_encoder",
    "image_statistics",
    "min_image_size",
]
