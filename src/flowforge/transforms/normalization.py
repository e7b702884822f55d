r"""Normalization layers as bijections: ActNorm (Glow) and the BatchNorm flow layer (MAF).

Both are affine maps with one scale and one shift per feature (per channel for images), so the
Jacobian is diagonal and :math:`\log|\det J|` is a sum of log-scales. Forward is the normalizing
direction (data -> noise), as for every transform: it subtracts a location and divides by a scale.

* :class:`ActNorm` learns its location and scale, initialised from the first training batch.
* :class:`BatchNorm` normalises with the statistics of the current batch in training mode and
  with running averages of them in eval mode, followed by a learnable affine map.

References:
    Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
    Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow for Density Estimation. NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.transforms.base import Transform
from flowforge.validation import check_bool, check_count, check_real, describe_shape


class ActNorm(Transform):
    r"""Activation normalization (Glow): a learnable per-feature affine map, initialised from data.

    .. math::
        z = (x - \mu) \odot e^{s}, \qquad x = z \odot e^{-s} + \mu, \qquad
        \log|\det J_f| = m \sum_i s_i,

    with a shift :math:`\mu` (``shift``) and a log-scale :math:`s` (``log_scale``) per feature,
    and :math:`m` the number of positions that share them (1 for vectors, :math:`H W` for images).

    **Data-dependent initialisation.** The first forward pass in training mode sets
    :math:`\mu` to the batch mean and :math:`s = -\tfrac12 \log \max(\sigma^2, 10^{-6})` (batch
    variance :math:`\sigma^2`, biased), so that this batch comes out with zero mean and unit
    variance per feature, then computes the output with these values (and a graph through them).
    Under data-parallel training (a ``torch.distributed`` process group) the mean and variance are
    those of the union of every process's first batch (equal shares), so the processes stay identical.
    The ``initialized`` buffer records that this happened; it is part of the state dict, so a
    layer that loads a trained state is not re-initialised. Until then the layer is the
    identity: :meth:`inverse` and eval-mode forward passes never initialise it.

    Arguments:
        features: number of features of vector input ``(batch, features)``, or of channels of
            image input ``(batch, features, H, W)`` (one shift and scale per channel).
        image: accept only images ``(batch, features, H, W)``. The layer then reports
            ``features = None`` (it does not act on a vector of fixed size), so it can sit in a
            stack whose channel count changes between layers (Glow's squeezes).

    The layer takes no context; a ``context`` argument is accepted and ignored.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = ActNorm(3)
    >>> x = 5.0 + 2.0 * torch.randn(256, 3)
    >>> z, ladj = layer(x)  # training mode: this first batch initialises the layer
    >>> z.mean(0).abs().max() < 1e-5, (z.var(0, unbiased=False) - 1).abs().max() < 1e-5
    (tensor(True), tensor(True))
    >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5), ladj.shape
    (True, torch.Size([256]))
    >>> layer(torch.randn(2, 3, 8, 8))[1].shape  # images: per-channel parameters
    torch.Size([2])
    """

    #: floor on the batch variance used at initialisation (a constant feature gets scale 1e3).
    min_init_variance = 1e-6

    def __init__(self, features: int, *, image: bool = False) -> None:
        super().__init__()
        self.channels = check_count("features", features)
        self.image = check_bool("image", image)
        self.features = None if image else self.channels
        self.shift = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of ``initialized`` so that training steps do not read the buffer (a GPU
        # sync) every call; read once from every state dict loaded.
        self._known_initialized = False
        self.register_load_state_dict_post_hook(ActNorm._read_initialization)

    @staticmethod
    def _read_initialization(module: nn.Module, incompatible_keys: Any) -> None:
        # Once, eagerly, at load: a loaded layer then never asks again, compiled or not.
        module._known_initialized = module.initialized.device.type != "meta" and bool(module.initialized)

    def _check(self, name: str, value: Tensor) -> None:
        image_shape = describe_shape(("batch", self.channels, "H", "W"))
        expected = image_shape if self.image else f"{describe_shape(('batch', self.channels))} or {image_shape}"
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
        if value.dim() not in ((4,) if self.image else (2, 4)) or value.shape[1] != self.channels:
            raise ValueError(f"{name} must have shape {expected}, got {describe_shape(tuple(value.shape))}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")

    def _initialize(self, x: Tensor, unless_initialized: bool = False) -> None:
        """Set shift and scale from the batch ``x``; ``unless_initialized``: keep those of an
        initialised layer, decided on the device (a compiled graph reads no flag back)."""
        dims = [0, *range(2, x.dim())]
        if x.numel() // self.channels < 2:
            raise ValueError(
                f"ActNorm initialises from its first training batch, which needs at least 2 values per feature; "
                f"got x of shape {describe_shape(tuple(x.shape))}"
            )
        with torch.no_grad():
            x = x.detach()
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Under data-parallel training every process starts from the statistics of the
                # global first batch, so the processes' layers stay identical.
                world = torch.distributed.get_world_size()
                moments = torch.cat([mean, var + mean.square()]).to(torch.promote_types(x.dtype, torch.float32))
                torch.distributed.all_reduce(moments)
                moments = (moments / world).to(x.dtype)
                mean, second = moments[: self.channels], moments[self.channels :]
                var = second - mean.square()
            var = var.clamp_min(self.min_init_variance)
            log_scale = -0.5 * var.log()
            if unless_initialized:
                mean = torch.where(self.initialized, self.shift, mean)
                log_scale = torch.where(self.initialized, self.log_scale, log_scale)
            self.shift.copy_(mean)
            self.log_scale.copy_(log_scale)
            self.initialized.fill_(True)

    def _broadcast(self, param: Tensor, value: Tensor) -> Tensor:
        return param.view(1, -1, *([1] * (value.dim() - 2)))

    def _logabsdet(self, value: Tensor) -> Tensor:
        positions = math.prod(value.shape[2:])
        return (self.log_scale.sum() * positions).repeat(value.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("x", x)
        if self.training and not self._known_initialized:
            if torch.compiler.is_compiling():
                self._initialize(x, unless_initialized=True)
            elif not bool(self.initialized):
                self._initialize(x)
            self._known_initialized = True
        z = (x - self._broadcast(self.shift, x)) * self._broadcast(self.log_scale, x).exp()
        return z, self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("z", z)
        x = z * self._broadcast(-self.log_scale, z).exp() + self._broadcast(self.shift, z)
        return x, -self._logabsdet(z)

    def extra_repr(self) -> str:
        return f"features={self.channels}" + (", image=True" if self.image else "")


class _SumOverProcesses(torch.autograd.Function):
    r"""BatchNorm's differentiable all-reduce: :math:`s = \sum_p t_p` on every process, and in the
    backward pass :math:`\partial L / \partial t_p = \sum_q \partial L_q / \partial s` (the upstream
    gradients of every process, summed). The same map as the deprecated
    ``torch.distributed.nn.functional.all_reduce``, on the public ``torch.distributed.all_reduce``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumOverProcesses.apply(grad)


class BatchNorm(Transform):
    r"""Batch normalization as a flow layer (MAF, Papamakarios et al. 2017).

    .. math::
        z = \frac{x - m}{\sqrt{v + \epsilon}} \odot e^{\gamma} + \beta, \qquad
        \log|\det J_f| = \sum_i \Big(\gamma_i - \tfrac12 \log(v_i + \epsilon)\Big),

    with learnable ``log_gamma`` (:math:`\gamma`) and ``beta`` (:math:`\beta`), both starting at 0.

    * **Training mode**: :math:`m, v` are the mean and (biased) variance of the current batch,
      and the running statistics are updated as in :class:`torch.nn.BatchNorm1d`:
      ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance). The
      log-determinant is that of the map applied to each row with :math:`m, v` held fixed, as in
      the MAF paper; gradients still flow through :math:`m, v` to whatever produced the batch.
      A batch needs at least 2 rows.
    * **Eval mode**: :math:`m, v` are ``running_mean`` and ``running_var``; the layer is then an
      ordinary row-wise bijection with an exact inverse.

    **Data-parallel training.** When a ``torch.distributed`` process group of more than one
    process is initialised (``torchrun``), the training-mode statistics are those of the *global*
    batch, the union of every process's rows. Each process sums, over its :math:`n_p` rows,
    :math:`y = x - c` and :math:`y^2` with :math:`c` the running mean (the same on every process;
    the shift keeps :math:`\mathbb E[y^2] - \mathbb E[y]^2` from cancelling), and one
    differentiable all-reduce (``torch.distributed.all_reduce`` forward and backward) adds
    ``[sum y, sum y^2, n_p]`` over the processes:

    .. math::
        n = \sum_p n_p, \qquad m = c + \frac1n \sum y, \qquad
        v = \frac1n \sum y^2 - \Big(\frac1n \sum y\Big)^2 .

    That all-reduce is differentiable (its backward all-reduces the gradients), so every process
    backpropagates through the global statistics, and ``P`` processes with ``B / P`` rows each
    compute the same map, log-determinant, gradients and running statistics as one process with
    the ``B`` rows (up to floating-point summation order). Every process must therefore call
    ``forward`` in training mode together (as data-parallel training does); eval mode never
    communicates. Set ``sync_statistics = False`` on a layer to keep per-process statistics. With
    no process group, or one process, nothing changes.

    **The inverse is only available in eval mode.** In training mode forward normalises with the
    statistics of its own batch, which cannot be recovered from :math:`z`; inverting with the
    running statistics instead would silently compute the inverse of a different map than the
    forward pass just applied (samples drawn in training mode would not match the densities
    assigned in training mode). So :meth:`inverse` raises a ``RuntimeError`` in training mode:
    call ``.eval()`` before sampling.

    Arguments:
        features: size of the vector ``(batch, features)``.
        momentum: weight of the newest batch in the running statistics, in (0, 1].
        eps: added to the variance before the square root, positive.

    The layer takes no context; a ``context`` argument is accepted and ignored.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = BatchNorm(2, momentum=0.5)
    >>> for _ in range(20):
    ...     z, ladj = layer(3.0 + 2.0 * torch.randn(512, 2))  # training mode: batch statistics
    >>> layer.running_mean.round(), layer.running_var.round()
    (tensor([3., 3.]), tensor([4., 4.]))
    >>> layer = layer.eval()
    >>> x = torch.randn(4, 2)
    >>> z, ladj = layer(x)
    >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-6), torch.allclose(layer.inverse(z)[1], -ladj)
    (True, True)
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.features = check_count("features", features)
        momentum = check_real("momentum", momentum)
        if not (0.0 < momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.eps = check_real("eps", eps, positive=True)
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    #: In training mode under a process group of several processes, use the statistics of the
    #: global batch (see the class notes); False keeps each process's own.
    sync_statistics: bool = True

    @staticmethod
    def _process_count() -> int:
        """Processes in the default ``torch.distributed`` group (1 without one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and variance the forward map uses on ``x`` (updating the running ones in training)."""
        if not self.training:
            return self.running_mean, self.running_var
        if self.sync_statistics and self._process_count() > 1:
            if x.shape[0] < 1:  # the global batch has at least one row per process, so >= 2 rows
                raise ValueError("BatchNorm in training mode needs at least 1 row per process, got an empty batch")
            mean, var, n = self._global_statistics(x)
        else:
            if x.shape[0] < 2:
                raise ValueError(
                    f"BatchNorm in training mode normalises with batch statistics and needs x with at least 2 rows, "
                    f"got shape {describe_shape(tuple(x.shape))}; call .eval() to use the running statistics"
                )
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            n = x.shape[0]
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean), self.momentum)
            self.running_var.lerp_((var.detach() * (n / (n - 1))).to(self.running_var), self.momentum)
        return mean, var

    def _global_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, biased variance and row count of the union of every process's ``x`` (differentiable)."""
        # Sums in at least float32: half-precision sums of many rows (and the count) would round.
        dtype = torch.promote_types(x.dtype, torch.float32)
        shift = self.running_mean.detach().to(dtype)
        y = x.to(dtype) - shift
        count = torch.full((1,), x.shape[0], dtype=dtype, device=x.device)
        total = _SumOverProcesses.apply(torch.cat([y.sum(0), y.square().sum(0), count]))
        sums, squares, n = total[: self.features], total[self.features : -1], total[-1]
        mean_y = sums / n
        var = (squares / n - mean_y.square()).clamp_min(0.0)
        return (shift + mean_y).to(x.dtype), var.to(x.dtype), n.detach()

    def _log_scale(self, var: Tensor) -> Tensor:
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, None)
        mean, var = self._statistics(x)
        log_scale = self._log_scale(var)
        z = (x - mean) * log_scale.exp() + self.beta
        return z, log_scale.sum().repeat(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, None)
        if self.training:
            raise RuntimeError(
                "BatchNorm.inverse is only defined in eval mode: in training mode forward normalises with the "
                "statistics of its own batch, which cannot be recovered from z. Call .eval() first (the inverse "
                "then undoes the eval-mode forward, which uses the running statistics)."
            )
        log_scale = self._log_scale(self.running_var)
        x = (z - self.beta) * (-log_scale).exp() + self.running_mean
        return x, -log_scale.sum().repeat(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}, momentum={self.momentum}, eps={self.eps}"
