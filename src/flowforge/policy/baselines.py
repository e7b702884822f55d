r"""Baselines inside the same code, encoders and data as the flow policies.

* :class:`RegressionPolicy`: deterministic regression of the chunk. The action tokens are learned
  queries (no noise, no time); the loss is the masked mean squared error. One network pass.
* :class:`DiffusionPolicy`: DDPM (Ho et al. 2020) on the chunk, as in Diffusion Policy (Chi et
  al. 2023). With a cosine schedule :math:`\bar\alpha_k` over ``diffusion_steps`` = K steps,
  :math:`A_k = \sqrt{\bar\alpha_k} A + \sqrt{1 - \bar\alpha_k}\,\varepsilon` and the expert predicts
  :math:`\varepsilon`. Sampling runs the ancestral DDPM chain over all K steps (``sampler="ddpm"``)
  or DDIM's deterministic update (Song et al. 2021) on ``inference_steps`` evenly spaced steps.
  The step enters the expert as the time :math:`k / K`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowforge.nn.transformer import PrefixSuffixTransformer
from flowforge.policy.core import Batch, ChunkPolicy, DenoisingPolicy, PolicyConfig, Sampling
from flowforge.registry import register


@register("mse", "policy")
class RegressionPolicy(ChunkPolicy):
    """Deterministic chunk regression with the same prefix and transformer (the MSE baseline)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.transformer = PrefixSuffixTransformer(config.width, config.layers, config.heads)
        self.queries = nn.Parameter(0.02 * torch.randn(config.horizon, config.width))
        self.action_head = nn.Linear(config.width, config.action_dim)

    def _predict(self, prefix: Tensor) -> Tensor:
        queries = self.queries.expand(prefix.shape[0], -1, -1)
        return self.action_head(self.transformer(prefix, queries)[0])

    def loss(self, batch: Batch) -> Tensor:
        predicted = self._predict(self.prefix(batch))
        target = self.target_actions(batch)
        return self.masked_mean((predicted - target).square(), batch.get("action_is_pad"))

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """A regression policy has nothing to sample: every override is refused."""
        for name, value in (("steps", steps), ("method", method), ("noise_scale", noise_scale)):
            if value is not None:
                raise ValueError(
                    f"{name} = {value!r}: a regression (mse) policy predicts in one pass and takes no {name}"
                )
        return Sampling(1, "regression", 0.0)

    def sample_normalized(
        self, batch: Batch, sampling: Sampling, use_cache: bool = True, noise: Tensor | None = None
    ) -> tuple[Tensor, int]:
        return self._predict(self.prefix(batch)), 1


def cosine_alpha_bar(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    r""":math:`\bar\alpha_k`, k = 1..K, of the cosine schedule (Nichol & Dhariwal 2021), with the
    betas clipped at ``max_beta``."""

    def f(k: Tensor) -> Tensor:
        return torch.cos((k / steps + offset) / (1 + offset) * math.pi / 2) ** 2

    k = torch.arange(steps + 1, dtype=torch.float64)
    betas = (1 - f(k[1:]) / f(k[:-1])).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0).float()


@register("ddpm", "policy")
class DiffusionPolicy(DenoisingPolicy):
    """DDPM / DDIM chunk diffusion with the same prefix and action expert (the diffusion baseline)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.register_buffer("alpha_bar", cosine_alpha_bar(config.diffusion_steps))

    def loss(self, batch: Batch) -> Tensor:
        target = self.target_actions(batch)
        rows, steps = target.shape[0], self.policy_config.diffusion_steps
        k = torch.randint(0, steps, (rows,), device=target.device)
        alpha_bar = self.alpha_bar[k][:, None, None]
        noise = torch.randn_like(target)
        noisy = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
        predicted = self.denoise(noisy, (k + 1).to(target.dtype) / steps, self.encode(self.prefix(batch)))
        return self.masked_mean((predicted - noise).square(), batch.get("action_is_pad"))

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """``steps``: DDIM steps (``inference_steps`` by default; DDPM always runs every training
        step); ``method``: ``"ddim"`` or ``"ddpm"`` (``sampler`` by default). No temperature."""
        cfg = self.policy_config
        if noise_scale is not None:
            raise ValueError(f"noise_scale = {noise_scale!r}: only the flow policies take a sampling temperature")
        method = cfg.sampler if method is None else method
        if method not in ("ddim", "ddpm"):
            raise ValueError(f"method {method!r} is not a diffusion sampler; choose 'ddim' or 'ddpm'")
        steps = cfg.inference_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= cfg.diffusion_steps:
            raise ValueError(f"steps must be an int in 1..{cfg.diffusion_steps} (the training steps), got {steps!r}")
        return Sampling(cfg.diffusion_steps if method == "ddpm" else steps, method, 1.0)

    def sample_normalized(
        self, batch: Batch, sampling: Sampling, use_cache: bool = True, noise: Tensor | None = None
    ) -> tuple[Tensor, int]:
        cfg = self.policy_config
        prefix = self.prefix(batch)
        cache = self.encode(prefix) if use_cache else None
        rows = prefix.shape[0]
        x = torch.randn(rows, cfg.horizon, cfg.action_dim) if noise is None else noise
        x = x.to(prefix)
        if sampling.method == "ddpm":
            schedule = list(range(cfg.diffusion_steps - 1, -1, -1))
        else:
            schedule = torch.linspace(cfg.diffusion_steps - 1, 0, sampling.steps).round().long().tolist()
        for i, k in enumerate(schedule):
            t = torch.full((rows,), (k + 1) / cfg.diffusion_steps, device=x.device)
            eps = self.denoise(x, t, cache) if use_cache else self.denoise_uncached(x, t, self.prefix(batch))
            alpha_bar = self.alpha_bar[k]
            previous = self.alpha_bar[schedule[i + 1]] if i + 1 < len(schedule) else torch.ones_like(alpha_bar)
            data = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            if cfg.action_normalization == "min_max":  # training actions lie in [-1, 1]: clip the estimate near it
                data = data.clamp(-1.5, 1.5)
            if sampling.method == "ddpm" and i + 1 < len(schedule):
                # Ancestral step: the posterior q(x_{k-1} | x_k, x_0) with x_0 the current estimate.
                beta = 1 - alpha_bar / previous
                mean = (previous.sqrt() * beta * data + (1 - beta).sqrt() * (1 - previous) * x) / (1 - alpha_bar)
                variance = beta * (1 - previous) / (1 - alpha_bar)
                x = mean + variance.sqrt() * torch.randn_like(x)
            else:
                # DDIM (eta = 0): keep the predicted noise, move to the previous noise level.
                eps = (x - alpha_bar.sqrt() * data) / (1 - alpha_bar).sqrt()
                x = previous.sqrt() * data + (1 - previous).sqrt() * eps
        return x, len(schedule)
