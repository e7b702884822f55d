r"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015).

An MLP whose weight masks make output :math:`j` depend only on the inputs that come before
:math:`j` in a chosen ``order`` (and on the context). Every unit gets a *degree* :math:`m`:

* input feature :math:`i` has degree :math:`\mathrm{rank}(i)` (its position in ``order``);
* a hidden unit of degree :math:`m` sees inputs of rank :math:`\le m` and hidden units of
  degree :math:`\le m`; context units have degree :math:`-1` and are seen by everyone;
* the outputs of feature :math:`j` see hidden units of degree :math:`< \mathrm{rank}(j)`.

Hidden units are laid out sorted by degree. This is what makes the sequential inverse of an
autoregressive flow cost one network pass in total instead of ``features`` passes: a hidden unit
of degree :math:`m` depends only on the first :math:`m + 1` ranks, so once those are known it is
computed once and never again (:meth:`MADE.autoregressive_inverse`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.nn.velocity import network_context
from flowforge.registry import refuse_unread
from flowforge.validation import check_activation, check_bool, check_count, check_permutation, check_widths


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (``mask[out, in]``)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask must have shape ({out_features}, {in_features}), got {tuple(mask.shape)}")
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedResidualBlock(nn.Module):
    r""":math:`h + W_2\,\sigma(W_1\,\sigma(h))` with degree-preserving masks; starts as the identity."""

    def __init__(self, width: int, mask: Tensor, activation: nn.Module) -> None:
        super().__init__()
        self.first = MaskedLinear(width, width, mask)
        self.second = MaskedLinear(width, width, mask)
        self.activation = activation
        nn.init.zeros_(self.second.weight)
        nn.init.zeros_(self.second.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.second(self.activation(self.first(self.activation(h))))


def _hidden_degrees(width: int, lowest: int, levels: int) -> Tensor:
    """Spread degrees lowest .. lowest + levels - 1 evenly over ``width`` units, ascending."""
    return lowest + (torch.arange(width) * levels) // width


def _refresh_order(module: MADE, incompatible_keys: Any) -> None:
    module._order_list = module.order.tolist()


class MADE(nn.Module):
    """Masked MLP with the autoregressive property for any input order.

    Arguments:
        features: number of inputs ``D``.
        params_per_feature: outputs per input feature ``P``; the output has shape (batch, D, P).
        context: size of a context vector that every output may depend on (0 for none).
        hidden: hidden widths.
        residual: make every hidden layer after the first a masked residual block (all widths
            must then be equal).
        activation: activation constructor.
        order: the autoregressive order, a permutation of ``range(D)``; ``order[0]`` comes first.
            Defaults to ``0, 1, ..., D-1``.
        zero_init_output: start with zero outputs (the transform built on it starts as the identity).

    >>> import torch
    >>> made = MADE(3, params_per_feature=2, hidden=(16, 16), order=[2, 0, 1])
    >>> made(torch.randn(4, 3)).shape
    torch.Size([4, 3, 2])
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        order: Sequence[int] | Tensor | None = None,
        zero_init_output: bool = True,
    ) -> None:
        super().__init__()
        activation = check_activation("activation", activation)
        features = check_count("features", features)
        params_per_feature = check_count("params_per_feature", params_per_feature)
        context = check_count("context", context, low=0)
        hidden = check_widths("hidden", hidden)
        if not hidden:
            raise ValueError("hidden must hold at least one positive width, got ()")
        residual = check_bool("residual", residual)
        if residual and len(set(hidden)) != 1:
            raise ValueError(f"residual blocks need equal hidden widths, got {hidden}")
        if len(hidden) == 1:
            refuse_unread(
                MADE, {"residual": residual}, f"hidden = {list(hidden)} has no layer after the first to make residual"
            )
        # A copy: layers built from one order tensor must not share storage (safetensors refuses aliasing).
        order_t = torch.arange(features) if order is None else check_permutation("order", order, features)

        self.features, self.params_per_feature, self.context_features = features, params_per_feature, context
        self.residual = residual
        self.register_buffer("order", order_t)
        self.register_buffer("rank", torch.argsort(order_t))
        self.activation = activation()

        # Degrees: context-only units (-1) exist only with a context; D - 1 feature levels.
        lowest = -1 if context > 0 else 0
        levels = max(features - 1 - lowest, 1)
        input_degrees = torch.cat([self.rank, torch.full((context,), -1)])
        degrees = [_hidden_degrees(w, lowest, levels) for w in hidden]
        output_degrees = self.rank.repeat_interleave(params_per_feature)

        self.input_layer = MaskedLinear(features + context, hidden[0], degrees[0][:, None] >= input_degrees[None, :])
        blocks: list[nn.Module] = []
        for previous, current, width in zip(degrees[:-1], degrees[1:], hidden[1:], strict=True):
            mask = current[:, None] >= previous[None, :]
            if residual:
                blocks.append(MaskedResidualBlock(width, mask, self.activation))
            else:
                blocks.append(MaskedLinear(len(previous), width, mask))
        self.hidden_layers = nn.ModuleList(blocks)
        self.output_layer = MaskedLinear(
            hidden[-1], features * params_per_feature, output_degrees[:, None] > degrees[-1][None, :]
        )
        if zero_init_output:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)
        # _units_up_to[l][m + 2]: how many units of layer l have degree <= m, for m = -2 .. D-1.
        self._units_up_to = [[int((d <= m).sum()) for m in range(-2, features)] for d in degrees]
        # The order as a Python list (the inverse walks it; a list keeps compiled graphs static),
        # refreshed whenever a state dict replaces the buffer.
        self._order_list = order_t.tolist()
        self.register_load_state_dict_post_hook(_refresh_order)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters for every feature, shape (batch, D, P); row j depends on x[order[:rank(j)]] only."""
        context = network_context(context, self.context_features, x)
        inputs = x if context is None else torch.cat([x, context], dim=1)
        h = self.input_layer(inputs)
        for layer in self.hidden_layers:
            h = layer(h) if self.residual else layer(self.activation(h))
        return self.output_layer(self.activation(h)).unflatten(1, (self.features, self.params_per_feature))

    def autoregressive_inverse(
        self,
        z: Tensor,
        context: Tensor | None,
        invert: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """Solve ``z_j = tau(x_j; params_j(x_<j))`` for ``x`` one rank at a time.

        ``invert(z_j, params_j)`` maps a column ``(batch, 1)`` with its parameters ``(batch, 1, P)``
        back to ``(x_j, log-derivative)``. Each hidden unit is computed exactly once (at the rank
        where its inputs become final), so the whole solve costs one masked network pass plus
        ``D`` small steps. Returns ``x`` and the summed log-derivatives, shape (batch,).
        """
        context = network_context(context, self.context_features, z)
        batch, D, P = z.shape[0], self.features, self.params_per_feature
        order = self._order_list
        act = self.activation
        layers = [self.input_layer, *self.hidden_layers]
        x_weight = self.input_layer.masked_weight()[:, : self.features][:, self.order]  # columns in rank order
        first_pre = self.input_layer.bias.expand(batch, -1)
        if self.context_features:
            first_pre = first_pre + F.linear(context, self.input_layer.masked_weight()[:, self.features :])
        if self.residual:
            weights = [(blk.first.masked_weight(), blk.second.masked_weight()) for blk in self.hidden_layers]
        else:
            weights = [layer.masked_weight() for layer in self.hidden_layers]
        out_weight, out_bias = self.output_layer.masked_weight(), self.output_layer.bias

        # Per layer: the known prefix of pre-activations h and of activations act(h).
        pre = [z.new_zeros(batch, 0) for _ in layers]
        post = [z.new_zeros(batch, 0) for _ in layers]
        inner = [z.new_zeros(batch, 0) for _ in layers]  # act(first(act(h))) inside residual blocks
        x_ranked = z.new_zeros(batch, 0)
        log_derivatives = []
        up_to = self._units_up_to
        for r in range(D):
            # Hidden units of degree r - 1 see ranks < r, all known now: compute them, once.
            for l in range(len(layers)):
                start, end = up_to[l][r], up_to[l][r + 1]  # units of degree r - 1
                if l == 0:
                    new = first_pre[:, start:end] + x_ranked @ x_weight[start:end, :r].T
                else:
                    prev_end = up_to[l - 1][r + 1]
                    if self.residual:
                        w1, w2 = weights[l - 1]
                        b1, b2 = self.hidden_layers[l - 1].first.bias, self.hidden_layers[l - 1].second.bias
                        # A residual block keeps degrees: its input is this layer's own (same width) prefix.
                        h_in = pre[l - 1][:, start:end]
                        t = act(F.linear(post[l - 1], w1[start:end, :prev_end], b1[start:end]))
                        inner[l] = torch.cat([inner[l], t], dim=1)
                        new = h_in + F.linear(inner[l], w2[start:end, :end], b2[start:end])
                    else:
                        new = F.linear(
                            post[l - 1], weights[l - 1][start:end, :prev_end], self.hidden_layers[l - 1].bias[start:end]
                        )
                pre[l] = torch.cat([pre[l], new], dim=1)
                post[l] = torch.cat([post[l], act(new)], dim=1)
            j = order[r]
            rows = slice(j * P, (j + 1) * P)
            last_end = up_to[-1][r + 1]
            params = F.linear(post[-1], out_weight[rows, :last_end], out_bias[rows])
            x_j, log_derivative = invert(z[:, j : j + 1], params.unsqueeze(1))
            x_ranked = torch.cat([x_ranked, x_j], dim=1)
            log_derivatives.append(log_derivative)
        x = x_ranked[:, self.rank]
        return x, torch.cat(log_derivatives, dim=1).sum(1)

    def extra_repr(self) -> str:
        return f"order={self.order.tolist()}, residual={self.residual}"
