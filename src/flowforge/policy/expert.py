r"""The action expert: the suffix of pi0's prefix/suffix transformer, with the prefix's KV cache.

:class:`ActionExpert` holds a :class:`~flowforge.nn.transformer.PrefixSuffixTransformer` whose
suffix is the action chunk. :meth:`ActionExpert.encode` runs the prefix (the observation tokens)
once and returns an :class:`ExpertCache` holding its keys and values at every layer;
:meth:`ActionExpert.denoise` then runs only the :math:`H` suffix tokens against it, once per
denoising step. With ``use_cache=False`` the cache keeps the prefix instead (or a function that
encodes the observation again) and every step runs the joint pass with the block-causal mask:
what a policy without a KV cache costs, and the reference the cached path is tested against.

The suffix tokens are either a noisy chunk at a time :math:`t` (flow matching, diffusion: pi0's
MLP on ``[action embedding, sinusoidal time embedding]`` per step, plus a learned position per
step) or, for a regression head, one learned query per step (``queries=True``; no noise, no time).
A linear layer maps each output token to an action-sized vector (a velocity, a noise estimate or
the action itself, as the head reads it).

>>> import torch
>>> expert = ActionExpert(action_dim=2, horizon=4, width=16, layers=1, heads=2)
>>> prefix = torch.randn(3, 5, 16)
>>> x, t = torch.randn(3, 4, 2), torch.rand(3)
>>> cached = expert.denoise(x, t, expert.encode(prefix))
>>> uncached = expert.denoise(x, t, expert.encode(prefix, use_cache=False))
>>> cached.shape, torch.allclose(cached, uncached, atol=1e-5)
(torch.Size([3, 4, 2]), True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowforge.nn.transformer import PrefixCache, PrefixSuffixTransformer
from flowforge.nn.velocity import SinusoidalTimeEmbedding


class ActionTokens(nn.Module):
    """Suffix tokens for a noisy chunk at time t: pi0's MLP on ``[action embedding, time embedding]``
    per action token, plus a learned position per step of the chunk. With ``interval=True`` the MLP
    also reads the embedding of a time interval (the step of a shortcut model, the span of a
    MeanFlow average velocity)."""

    def __init__(
        self, action_dim: int, horizon: int, width: int, interval: bool = False, time_frequency: float = 100.0
    ) -> None:
        super().__init__()
        self.action_embedding = nn.Linear(action_dim, width)
        self.time_embedding = SinusoidalTimeEmbedding(width, max_frequency=time_frequency)
        self.interval_embedding = SinusoidalTimeEmbedding(width, max_frequency=time_frequency) if interval else None
        inputs = 3 if interval else 2
        self.mix = nn.Sequential(nn.Linear(inputs * width, width), nn.SiLU(), nn.Linear(width, width))
        self.position = nn.Parameter(0.02 * torch.randn(horizon, width))

    def forward(self, actions: Tensor, t: Tensor, interval: Tensor | None = None) -> Tensor:
        """``t``: (B,), or (B, H) for a time per token (training-time real-time chunking)."""
        steps = actions.shape[1]
        if t.dim() == 2:
            times = self.time_embedding(t.reshape(-1)).reshape(*t.shape, -1)
        else:
            times = self.time_embedding(t)[:, None].expand(-1, steps, -1)
        parts = [self.action_embedding(actions), times]
        if self.interval_embedding is not None:
            if interval is None:
                raise ValueError("this expert reads a time interval: pass interval (B,)")
            parts.append(self.interval_embedding(interval)[:, None].expand(-1, steps, -1))
        elif interval is not None:
            raise ValueError("this expert was built without an interval input (ActionExpert(interval=True))")
        return self.mix(torch.cat(parts, dim=-1)) + self.position[:steps]


@dataclass
class ExpertCache:
    """An encoded observation as one expert reads it.

    ``prefix``: the prefix tokens, or a function that encodes the observation again (a policy
    without a cache re-encodes it at every step); ``keys_values``: the prefix's keys and values at
    every layer, or ``None`` without a cache. :meth:`denoise` evaluates the expert against it.
    """

    expert: ActionExpert
    prefix: Tensor | Callable[[], Tensor]
    keys_values: PrefixCache | None

    @property
    def uses_cache(self) -> bool:
        return self.keys_values is not None

    def rows(self, rows: slice) -> ExpertCache:
        """The cache of a slice of the batch's rows."""
        if self.keys_values is not None:
            keys_values = PrefixCache(
                [k[rows] for k in self.keys_values.keys], [v[rows] for v in self.keys_values.values]
            )
            return ExpertCache(self.expert, self.prefix_tokens()[rows], keys_values)
        prefix = self.prefix
        return ExpertCache(self.expert, lambda: (prefix() if callable(prefix) else prefix)[rows], None)

    def prefix_tokens(self) -> Tensor:
        return self.prefix() if callable(self.prefix) else self.prefix

    def denoise(self, x: Tensor | None, t: Tensor | None, interval: Tensor | None = None) -> Tensor:
        """``self.expert.denoise(x, t, self, interval)``."""
        return self.expert.denoise(x, t, self, interval)


class ActionExpert(nn.Module):
    """The suffix expert of the prefix/suffix transformer (see the module docstring).

    Arguments:
        action_dim: size of an action.
        horizon: suffix tokens (actions per chunk this expert denoises).
        width, layers, heads: the transformer's size.
        queries: learned queries instead of noisy actions (a regression head).
        interval: the suffix also reads a time interval (few-step heads).
        time_frequency: the highest frequency of the time (and interval) embeddings.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        width: int,
        layers: int,
        heads: int,
        queries: bool = False,
        interval: bool = False,
        time_frequency: float = 100.0,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.transformer = PrefixSuffixTransformer(width, layers, heads)
        if queries:
            self.queries = nn.Parameter(0.02 * torch.randn(horizon, width))
            self.action_tokens = None
        else:
            self.queries = None
            self.action_tokens = ActionTokens(action_dim, horizon, width, interval, time_frequency)
        self.output = nn.Linear(width, action_dim)

    def encode(self, prefix: Tensor | Callable[[], Tensor], use_cache: bool = True) -> ExpertCache:
        """The cache of an observation's prefix: its keys and values, computed once (``use_cache``),
        or the prefix itself for the joint pass at every step."""
        if not use_cache:
            return ExpertCache(self, prefix, None)
        tokens = prefix() if callable(prefix) else prefix
        return ExpertCache(self, tokens, self.transformer.encode_prefix(tokens))

    def suffix(self, x: Tensor | None, t: Tensor | None, rows: int, interval: Tensor | None = None) -> Tensor:
        if self.queries is not None:
            if x is not None or t is not None:
                raise ValueError("a query expert (regression) takes no noisy chunk: pass x = t = None")
            return self.queries.expand(rows, -1, -1)
        if x is None or t is None:
            raise ValueError("this expert denoises a chunk: x (B, H, A) and t (B,) are required")
        return self.action_tokens(x, t, interval)

    def denoise(self, x: Tensor | None, t: Tensor | None, cache: ExpertCache, interval: Tensor | None = None) -> Tensor:
        """The expert's output ``(B, H, A)`` for a noisy chunk ``x`` at times ``t`` (B,) against
        ``cache`` (``x = t = None`` for a query expert; ``interval`` (B,) for an interval expert)."""
        if cache.keys_values is not None:
            suffix = self.suffix(x, t, cache.keys_values.keys[0].shape[0], interval)
            return self.output(self.transformer.decode_suffix(suffix, cache.keys_values))
        prefix = cache.prefix_tokens()
        return self.output(self.transformer(prefix, self.suffix(x, t, prefix.shape[0], interval))[0])


__all__ = ["ActionExpert", "ActionTokens", "ExpertCache"]
