"""The invariant harness: mathematical checks that every transform and every flow must pass.

Cases live in ``tests/cases.py``; a new transform or recipe joins the harness by adding one
entry there. The checks themselves are plain functions so a test can also call them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from flowforge.flows import Flow
from flowforge.transforms import Transform


@dataclass(frozen=True)
class TransformCase:
    """A transform to check: ``build(context)`` returns it with ``context`` context features."""

    name: str
    build: Callable[[int], Transform]
    features: int
    conditional: bool = True  # whether a context variant exists
    # Parameter noise added before checking (see randomize_); deep stacks need less to stay
    # well conditioned on inputs of scale 10.
    randomize_scale: float = 0.1
    # Training-mode forward passes on data (see warm_up_) run before the checks, so that
    # data-dependent initialisation (ActNorm) and running statistics (BatchNorm) have left their
    # defaults and the checks do not look at a trivial identity.
    warmup_batches: int = 0
    # Whether a row's training-mode output depends on the other rows of the batch (BatchNorm).
    # The Jacobian checks assume rows are independent, so such a transform is checked in eval
    # mode (after its warm-up moved the running statistics) and left out of the train/eval test.
    batch_dependent: bool = False

    def __post_init__(self) -> None:
        if self.warmup_batches < 0:
            raise ValueError(f"{self.name}: warmup_batches must be >= 0, got {self.warmup_batches}")
        if self.batch_dependent and self.warmup_batches < 1:
            raise ValueError(
                f"{self.name}: a batch-dependent case is checked in eval mode and needs warmup_batches >= 1, "
                "or its running statistics would still be at their defaults"
            )

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FlowCase:
    """A flow to check: ``build(context)`` returns it with ``context`` context features."""

    name: str
    build: Callable[[int], Flow]
    features: int
    conditional: bool = True
    randomize_scale: float = 0.1
    # Flows whose log-det comes from an ODE solve match autograd and the opposite-direction solve
    # only to the solver's accuracy; float64 checks use this floor instead of ~1e-9.
    float64_tolerance: float = 1e-9

    def __str__(self) -> str:
        return self.name


CONTEXT = 3  # context size used for every conditional variant


def randomize_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Perturb every parameter so that identity initialisations (zero last layers) cannot hide a
    disconnected parameter or make a log-det check trivially pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))
    return module


def random_inputs(n: int, features: int, dtype: torch.dtype, seed: int = 0, max_scale: float = 10.0) -> Tensor:
    """Gaussian directions with per-row scales spread uniformly over [0, max_scale]."""
    generator = torch.Generator().manual_seed(seed)
    scale = max_scale * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return (scale * torch.randn(n, features, generator=generator, dtype=torch.float64)).to(dtype)


def random_context(n: int, context: int, dtype: torch.dtype, seed: int = 1) -> Tensor | None:
    if context == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, context, generator=generator, dtype=torch.float64).to(dtype)


def warmup_inputs(n: int, features: int, dtype: torch.dtype, seed: int = 2) -> Tensor:
    """Data unlike the base noise: feature i has mean -1.5 + 4 i / (features - 1) and standard
    deviation 0.5 + 2 i / (features - 1), so statistics learnt from it are far from 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    position = torch.linspace(0.0, 1.0, features, dtype=torch.float64)
    noise = torch.randn(n, features, generator=generator, dtype=torch.float64)
    return (-1.5 + 4.0 * position + (0.5 + 2.0 * position) * noise).to(dtype)


def warm_up_(module: nn.Module, features: int, context: int, batches: int, seed: int = 2) -> nn.Module:
    """Run ``batches`` training-mode forward passes of 256 rows of :func:`warmup_inputs` through
    ``module`` (a transform or a flow: called as ``module(x, context)``), without a graph.

    This performs data-dependent initialisation and moves running statistics off their
    defaults, as the first steps of training would. The module's mode is restored afterwards.
    """
    if batches == 0:
        return module
    floating = [t for t in module.state_dict().values() if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.get_default_dtype()
    was_training = module.training
    module.train()
    with torch.no_grad():
        for i in range(batches):
            x = warmup_inputs(256, features, dtype, seed=seed + i)
            module(x, random_context(256, context, dtype, seed=seed + 1000 + i))
    return module.train(was_training)


def per_sample_jacobians(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Jacobians of a row-wise map at every row of ``x``: shape (batch, features_out, features_in).

    Rows do not interact, so the Jacobian of ``fn(x).sum(0)`` with respect to ``x`` holds each
    row's own Jacobian; ``torch.autograd.functional.jacobian`` computes it in one vectorised call.
    """
    jac = torch.autograd.functional.jacobian(lambda inp: fn(inp).sum(0), x, vectorize=True)
    return jac.permute(1, 0, 2)


def autograd_logabsdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log|det J| of a row-wise map, by autograd and a float64 determinant."""
    return torch.linalg.slogdet(per_sample_jacobians(fn, x).double()).logabsdet


def round_trip_errors(t: Transform, x: Tensor, context: Tensor | None) -> tuple[float, float]:
    """Max |inverse(forward(x)) - x| and max |forward(inverse(x)) - x|."""
    with torch.no_grad():
        z, _ = t(x, context)
        x_back, _ = t.inverse(z, context)
        u, _ = t.inverse(x, context)
        x_fwd, _ = t(u, context)
    return float((x_back - x).abs().max()), float((x_fwd - x).abs().max())


def logabsdet_errors(t: Transform, x: Tensor, context: Tensor | None) -> tuple[float, float]:
    """Max |logabsdet - autograd| for the forward and for the inverse direction."""
    with torch.no_grad():
        _, ladj_forward = t(x, context)
        _, ladj_inverse = t.inverse(x, context)
    ref_forward = autograd_logabsdet(lambda inp: t(inp, context)[0], x)
    ref_inverse = autograd_logabsdet(lambda inp: t.inverse(inp, context)[0], x)
    return (
        float((ladj_forward.double() - ref_forward).abs().max()),
        float((ladj_inverse.double() - ref_inverse).abs().max()),
    )


def parameters_without_gradient(module: nn.Module, loss: Tensor) -> list[str]:
    """Names of trainable parameters whose gradient is missing or exactly zero after ``loss``."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [
        name
        for name, p in module.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
    ]


def safetensors_round_trip(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy ``source``'s state into ``target`` through safetensors bytes (no pickle)."""
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    target.load_state_dict(load(save(state)))
    return target


def density_mass_2d(
    log_prob: Callable[[Tensor], Tensor], bound: float, resolution: int, dtype: torch.dtype = torch.float64
) -> float:
    """Midpoint-rule integral of exp(log_prob) over the square [-bound, bound]^2."""
    h = 2 * bound / resolution
    centers = -bound + h * (torch.arange(resolution, dtype=dtype) + 0.5)
    grid = torch.stack(torch.meshgrid(centers, centers, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        total = sum(float(log_prob(chunk).exp().sum()) for chunk in grid.split(65536))
    return total * h * h


def edit_checkpoint(directory, change: Callable[[dict], None]) -> None:
    """Edit a checkpoint's manifest with ``change`` and save it again as flowforge would have written
    it (the settings digest in the model file renewed): for tests of the checks behind that digest,
    which a plain edit of checkpoint.json never reaches."""
    import json
    from pathlib import Path

    from flowforge.checkpoint import save_checkpoint

    directory = Path(directory)
    manifest = json.loads((directory / "checkpoint.json").read_text())
    groups = {group: load((directory / entry["file"]).read_bytes()) for group, entry in manifest["files"].items()}
    change(manifest)
    save_checkpoint(directory, groups, {k: v for k, v in manifest.items() if k not in ("format", "version", "files")})
