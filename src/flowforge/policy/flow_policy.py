r"""pi0-style flow-matching action policies: :class:`FlowPolicy` and :class:`HierarchicalFlowPolicy`.

**Training** (flow matching on the whole chunk). With the normalised chunk :math:`A` (H x A),
noise :math:`\varepsilon \sim \mathcal N(0, I)` and pi0's time distribution
(:class:`~flowforge.matching.ShiftedBetaTime`, favouring noisy times),

.. math::
    A_t = (1 - t)\,\varepsilon + t A, \qquad
    \mathcal L = \big\| v_\theta(A_t, t, o) - (A - \varepsilon) \big\|^2,

averaged over the chunk steps that are not padding past the end of an episode. The time is
injected per action token (:class:`~flowforge.policy.core.ActionTokens`). flowforge's time runs
from noise (0) to data (1); openpi's runs the other way, which only flips the sign of the field.

**Sampling**: encode the observation prefix once, cache its keys and values, and integrate
:math:`dA/dt = v_\theta(A, t, o)` from noise at :math:`t = 0` to :math:`t = 1` with
``sampling_steps`` Euler steps (or any flowforge solver: ``method="rk4"``, ``"dopri5"``...),
each step running only the action tokens.

**Hierarchical**: a coarse flow first generates the keyframes of the chunk (every
``keyframe_stride``-th action), then a fine flow generates the whole chunk with the keyframes as
extra prefix tokens. Trained jointly: the fine flow sees the true keyframes (teacher forcing).

References:
    Black et al. pi0: A Vision-Language-Action Flow Model for General Robot Control. 2024.
    Lipman et al. Flow Matching for Generative Modeling. ICLR 2023.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowforge.matching.functional import Integration, flow_matching_loss, integrate
from flowforge.matching.paths import LinearPath
from flowforge.matching.time import ShiftedBetaTime
from flowforge.policy.core import Batch, DenoisingPolicy, PolicyConfig, Sampling
from flowforge.registry import register


@register("flow", "policy")
class FlowPolicy(DenoisingPolicy):
    """The flow-matching action policy (pi0 recipe at laptop scale). See the module docstring.

    >>> import torch
    >>> policy = FlowPolicy(PolicyConfig(state_dim=3, action_dim=2, horizon=4, width=32, layers=1, language=False))
    >>> pad = torch.zeros(5, 4, dtype=torch.bool)
    >>> batch = {"state": torch.randn(5, 1, 3), "action": torch.randn(5, 4, 2), "action_is_pad": pad}
    >>> result = policy.predict_chunk(batch)
    >>> policy.loss(batch).shape, result.actions.shape, result.nfe
    (torch.Size([]), torch.Size([5, 4, 2]), 10)
    """

    def __init__(self, config: PolicyConfig, horizon: int | None = None) -> None:
        super().__init__(config, horizon)
        self.path = LinearPath()
        self.time_sampler = ShiftedBetaTime()

    def flow_loss(self, target: Tensor, prefix: Tensor, action_is_pad: Tensor | None) -> Tensor:
        noise = torch.randn_like(target)
        t = self.time_sampler(target.shape[0], device=target.device, dtype=target.dtype)
        cache = self.encode(prefix)
        keep = None if action_is_pad is None else ~action_is_pad  # padded steps past an episode's end
        return flow_matching_loss(lambda x, time: self.denoise(x, time, cache), noise, target, t, self.path, mask=keep)

    def loss(self, batch: Batch) -> Tensor:
        return self.flow_loss(self.target_actions(batch), self.prefix(batch), batch.get("action_is_pad"))

    def integrate(
        self,
        prefix: Tensor | Callable[[], Tensor],
        use_cache: bool,
        noise: Tensor | None,
        horizon: int,
        sampling: Sampling,
    ) -> Integration:
        """Noise to a normalised chunk with the solver of ``sampling``; the chunk and its NFE.

        ``prefix``: the observation tokens, or a function that encodes them again at every
        evaluation (what a policy without a cache does; ``use_cache=False``). ``noise``: a standard
        normal draw; integration starts from ``sampling.noise_scale * noise``.
        """
        if noise is None:
            reference = prefix() if callable(prefix) else prefix
            shape = (reference.shape[0], horizon, self.policy_config.action_dim)
            noise = torch.randn(shape, device=reference.device, dtype=reference.dtype)
        noise = sampling.noise_scale * noise.to(self.state_normalizer.shift)  # a supplied draw may live elsewhere
        cache = None
        if use_cache:
            cache = self.encode(prefix() if callable(prefix) else prefix)

        def field(x: Tensor, t: Tensor) -> Tensor:
            if cache is not None:
                return self.denoise(x, t, cache)
            return self.denoise_uncached(x, t, prefix() if callable(prefix) else prefix)

        return integrate(field, noise, method=sampling.method, steps=sampling.steps)

    def sample_normalized(
        self, batch: Batch, sampling: Sampling, use_cache: bool = True, noise: Tensor | None = None
    ) -> tuple[Tensor, int]:
        if noise is None:
            noise = torch.randn(batch["state"].shape[0], self.chunk_horizon, self.policy_config.action_dim)
        # Without a cache a policy re-encodes the observation (encoders and prefix) at every step.
        prefix = self.prefix(batch) if use_cache else (lambda: self.prefix(batch))
        result = self.integrate(prefix, use_cache, noise, self.chunk_horizon, sampling)
        return result.x, result.nfe


@register("hierarchical", "policy")
class HierarchicalFlowPolicy(FlowPolicy):
    """Coarse-to-fine flow policy: keyframes first, then the full chunk conditioned on them.

    The coarse flow (this module's own expert) generates ``horizon / keyframe_stride`` keyframes
    (actions ``stride - 1, 2 stride - 1, ...`` of the chunk). The fine flow (``self.fine``) sees
    the observation prefix plus one token per keyframe and generates all ``horizon`` actions. Each
    flow integrates with ``sampling_steps`` steps, so a chunk costs twice the evaluations of a
    :class:`FlowPolicy` (reported in the chunk's ``nfe``).
    """

    def __init__(self, config: PolicyConfig) -> None:
        stride = config.keyframe_stride
        super().__init__(config, horizon=config.horizon // stride)
        self.stride = stride
        self.fine = FlowPolicy(config)
        self.keyframe_embedding = nn.Linear(config.action_dim, config.width)
        self.keyframe_position = nn.Parameter(0.02 * torch.randn(config.horizon // stride, config.width))
        # The observation encoders are this module's; the fine flow keeps only its expert.
        del self.fine.state_encoder, self.fine.prefix_position
        if self.fine.image_encoder is not None:
            del self.fine.image_encoder
            self.fine.image_encoder = None
        if config.language:
            del self.fine.language_projection

    def keyframes(self, chunk: Tensor) -> Tensor:
        return chunk[:, self.stride - 1 :: self.stride]

    def _fine_prefix(self, prefix: Tensor, keyframes: Tensor) -> Tensor:
        return torch.cat([prefix, self.keyframe_embedding(keyframes) + self.keyframe_position], dim=1)

    def loss(self, batch: Batch) -> Tensor:
        target = self.target_actions(batch)
        pad = batch.get("action_is_pad")
        prefix = self.prefix(batch)
        keyframes = self.keyframes(target)
        coarse = self.flow_loss(keyframes, prefix, None if pad is None else self.keyframes(pad))
        fine = self.fine.flow_loss(target, self._fine_prefix(prefix, keyframes), pad)
        return coarse + fine

    def sample_normalized(
        self, batch: Batch, sampling: Sampling, use_cache: bool = True, noise: Tensor | None = None
    ) -> tuple[Tensor, int]:
        prefix = self.prefix(batch)
        coarse_noise = fine_noise = None
        if noise is not None:  # one noise tensor of the chunk's shape seeds both levels
            coarse_noise, fine_noise = self.keyframes(noise), noise
        coarse = self.integrate(prefix, use_cache, coarse_noise, self.chunk_horizon, sampling)
        fine = self.fine.integrate(
            self._fine_prefix(prefix, coarse.x), use_cache, fine_noise, self.fine.chunk_horizon, sampling
        )
        return fine.x, coarse.nfe + fine.nfe
