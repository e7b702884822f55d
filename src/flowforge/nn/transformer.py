r"""A two-expert transformer over a prefix and a suffix with pi0's block-causal attention.

pi0 (Black et al. 2024) runs one attention over two groups of tokens: a *prefix* (observation:
state, image and language tokens) and a *suffix* (the action chunk being denoised). Each group
has its own weights (the suffix's are the "action expert"), but the attention is shared, under
a block-causal mask:

* prefix tokens attend to every prefix token (bidirectional) and to no suffix token;
* suffix tokens attend to every prefix token and to every suffix token.

Because nothing in the prefix depends on the suffix, the prefix's keys and values at every layer
can be computed once and reused for every denoising step: :meth:`PrefixSuffixTransformer.encode_prefix`
returns them (the KV cache) and :meth:`PrefixSuffixTransformer.decode_suffix` runs only the
suffix tokens against it. :meth:`PrefixSuffixTransformer.forward` computes the same thing in one
joint pass with the explicit mask of :func:`block_causal_mask`; the tests check that the two agree.

Pre-LayerNorm blocks, ``torch.nn.functional.scaled_dot_product_attention``, GELU MLPs. Both experts
share the model width here (pi0's action expert is narrower but has the same head size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.validation import check_count


def block_causal_mask(prefix: int, suffix: int, device: torch.device | None = None) -> Tensor:
    """Boolean (L, L) with L = prefix + suffix: ``mask[i, j]`` is True when token i may attend to token j.

    >>> block_causal_mask(2, 2).int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    total = prefix + suffix
    key_is_prefix = torch.arange(total, device=device) < prefix
    query_is_suffix = torch.arange(total, device=device) >= prefix
    return key_is_prefix[None, :] | query_is_suffix[:, None]


class _ExpertWeights(nn.Module):
    """One group's weights in one layer: norms, query/key/value and output projections, MLP.

    ``keys_values_only``: the prefix's last layer, whose keys and values the suffix reads but
    whose own output nothing reads, needs only its norm and key/value projection.
    """

    def __init__(self, width: int, mlp_ratio: int, keys_values_only: bool = False) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.keys_values_only = keys_values_only
        self.qkv = nn.Linear(width, (2 if keys_values_only else 3) * width)
        if not keys_values_only:
            self.out = nn.Linear(width, width)
            self.mlp_norm = nn.LayerNorm(width)
            self.mlp = nn.Sequential(
                nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
            )


@dataclass
class PrefixCache:
    """Keys and values of the prefix at every layer, each (batch, heads, prefix tokens, head size)."""

    keys: list[Tensor]
    values: list[Tensor]

    def repeat(self, times: int) -> PrefixCache:
        """The cache for a batch where every row is repeated ``times`` times (row-major, like ``repeat_interleave``)."""
        return PrefixCache(
            [k.repeat_interleave(times, 0) for k in self.keys], [v.repeat_interleave(times, 0) for v in self.values]
        )


class PrefixSuffixTransformer(nn.Module):
    """A stack of layers with separate prefix and suffix (action-expert) weights and shared attention.

    Arguments:
        width: token width.
        layers: number of layers.
        heads: attention heads (``width`` divisible by it).
        mlp_ratio: hidden width of the MLPs over ``width``.

    >>> import torch
    >>> net = PrefixSuffixTransformer(width=32, layers=2, heads=4)
    >>> prefix, suffix = torch.randn(3, 5, 32), torch.randn(3, 4, 32)
    >>> cache = net.encode_prefix(prefix)
    >>> joint, _ = net(prefix, suffix)
    >>> torch.allclose(net.decode_suffix(suffix, cache), joint, atol=1e-5)
    True
    """

    def __init__(self, width: int = 128, layers: int = 4, heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        for name, value in (("width", width), ("layers", layers), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            check_count(name, value)
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.prefix_layers = nn.ModuleList(
            _ExpertWeights(width, mlp_ratio, keys_values_only=i == layers - 1) for i in range(layers)
        )
        self.suffix_layers = nn.ModuleList(_ExpertWeights(width, mlp_ratio) for _ in range(layers))
        self.suffix_norm = nn.LayerNorm(width)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def _qkv(self, weights: _ExpertWeights, h: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        projected = weights.qkv(weights.attention_norm(h))
        if weights.keys_values_only:
            k, v = projected.chunk(2, dim=-1)
            return None, self._split_heads(k), self._split_heads(v)
        q, k, v = projected.chunk(3, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _finish(self, weights: _ExpertWeights, h: Tensor, attended: Tensor) -> Tensor:
        b, _, n, _ = attended.shape
        h = h + weights.out(attended.transpose(1, 2).reshape(b, n, self.width))
        return h + weights.mlp(weights.mlp_norm(h))

    def encode_prefix(self, prefix: Tensor) -> PrefixCache:
        """Run the prefix alone (it never sees the suffix); return its keys and values at every layer."""
        keys, values = [], []
        h = prefix
        for weights in self.prefix_layers:
            q, k, v = self._qkv(weights, h)
            keys.append(k)
            values.append(v)
            if q is not None:
                h = self._finish(weights, h, F.scaled_dot_product_attention(q, k, v))
        return PrefixCache(keys, values)

    def decode_suffix(self, suffix: Tensor, cache: PrefixCache) -> Tensor:
        """Run the suffix tokens against a cached prefix; return the suffix's output tokens."""
        h = suffix
        for weights, prefix_k, prefix_v in zip(self.suffix_layers, cache.keys, cache.values, strict=True):
            q, k, v = self._qkv(weights, h)
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
            h = self._finish(weights, h, F.scaled_dot_product_attention(q, k, v))
        return self.suffix_norm(h)

    def forward(self, prefix: Tensor, suffix: Tensor) -> tuple[Tensor, PrefixCache]:
        """One joint pass over ``[prefix, suffix]`` with the explicit block-causal mask (no cache).

        Returns the suffix's output tokens and the prefix's keys and values as this pass computed
        them (equal to :meth:`encode_prefix`'s, which is what the mask guarantees).
        """
        n_prefix, n_suffix = prefix.shape[1], suffix.shape[1]
        mask = block_causal_mask(n_prefix, n_suffix, prefix.device)
        h_prefix, h_suffix = prefix, suffix
        keys, values = [], []
        for prefix_weights, suffix_weights in zip(self.prefix_layers, self.suffix_layers, strict=True):
            qp, kp, vp = self._qkv(prefix_weights, h_prefix)
            qs, ks, vs = self._qkv(suffix_weights, h_suffix)
            keys.append(kp)
            values.append(vp)
            k, v = torch.cat([kp, ks], dim=2), torch.cat([vp, vs], dim=2)
            if qp is None:  # the prefix's last layer: only the suffix's queries remain
                attended = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask[n_prefix:])
                h_suffix = self._finish(suffix_weights, h_suffix, attended)
                continue
            attended = F.scaled_dot_product_attention(torch.cat([qp, qs], dim=2), k, v, attn_mask=mask)
            h_prefix = self._finish(prefix_weights, h_prefix, attended[:, :, :n_prefix])
            h_suffix = self._finish(suffix_weights, h_suffix, attended[:, :, n_prefix:])
        return self.suffix_norm(h_suffix), PrefixCache(keys, values)
