"""Every transform and flow of the package, registered with the invariant harness.

A new transform or recipe is added here once; the harness tests then check it in float32 and
float64, with and without a context.
"""

from __future__ import annotations

import torch

from flowforge.distributions import DiagNormal, GaussianMixture, StandardNormal
from flowforge.flows import CNF, IAF, MAF, NICE, NSF, Flow, RealNVP, ResidualFlow
from flowforge.nn import MLP
from flowforge.transforms import (
    ActNorm,
    AdditiveCoupling,
    AdditiveElementwise,
    AffineCoupling,
    AffineElementwise,
    BatchNorm,
    Compose,
    Coupling,
    Invert,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
    ResidualBlock,
    Standardize,
)
from tests.invariants import FlowCase, TransformCase, warm_up_

SMALL = (16, 16)
MASK5 = torch.tensor([True, False, False, True, False])
ORDER5 = [3, 0, 4, 1, 2]


def _spline() -> RationalQuadraticSpline:
    # A bound of 3 puts a good share of the harness inputs (scale up to 10) in the linear tails.
    return RationalQuadraticSpline(bins=6, bound=3.0)


def _coupling_chain(context: int) -> Compose:
    return Compose(
        AffineCoupling(MASK5, context, SMALL),
        Permutation.random(5, seed=3),
        AdditiveCoupling(~MASK5, context, SMALL),
        Permutation.reverse(5),
        AffineCoupling(MASK5, context, SMALL, scale_bound=1.0),
    )


def _glow_step(context: int) -> Compose:
    """One Glow step on vectors: ActNorm, LU linear map, affine coupling (the first two ignore the context)."""
    return Compose(ActNorm(5), LULinear(5, identity_init=False), AffineCoupling(MASK5, context, SMALL))


def _coupling_batchnorm(context: int) -> Compose:
    """BatchNorm between couplings, as in the MAF paper's stacks."""
    return Compose(AffineCoupling(MASK5, context, SMALL), BatchNorm(5), AdditiveCoupling(~MASK5, context, SMALL))


TRANSFORM_CASES = [
    TransformCase("affine_coupling", lambda c: AffineCoupling(MASK5, c, SMALL), 5),
    TransformCase("affine_coupling_2d", lambda c: AffineCoupling(torch.tensor([False, True]), c, SMALL), 2),
    TransformCase("additive_coupling", lambda c: AdditiveCoupling(MASK5, c, SMALL), 5),
    TransformCase("permutation_random", lambda c: Permutation.random(5, seed=7), 5, conditional=False),
    TransformCase("permutation_reverse", lambda c: Permutation.reverse(4), 4, conditional=False),
    TransformCase("compose", _coupling_chain, 5),
    TransformCase("invert_affine_coupling", lambda c: Invert(AffineCoupling(MASK5, c, SMALL)), 5),
    # The recipes' full stacks at their default sizes.
    TransformCase("realnvp_stack", lambda c: RealNVP(5, c).transform, 5, randomize_scale=0.03),
    TransformCase("nice_stack", lambda c: NICE(5, c).transform, 5, randomize_scale=0.03),
    # Normalization and linear layers take no context (they accept and ignore one); the
    # compositions check that inside a conditional stack.
    TransformCase("actnorm", lambda c: ActNorm(5), 5, conditional=False, warmup_batches=1),
    TransformCase("actnorm_1d", lambda c: ActNorm(1), 1, conditional=False, warmup_batches=1),
    TransformCase("batchnorm", lambda c: BatchNorm(5), 5, conditional=False, warmup_batches=5, batch_dependent=True),
    TransformCase("lu_linear", lambda c: LULinear(5), 5, conditional=False),
    TransformCase("lu_linear_random_init", lambda c: LULinear(4, identity_init=False), 4, conditional=False),
    TransformCase("invert_lu_linear", lambda c: Invert(LULinear(3, identity_init=False)), 3, conditional=False),
    TransformCase(
        "standardize",
        lambda c: Standardize(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 2.0, 1.5])),
        3,
        conditional=False,
    ),
    TransformCase("glow_step", _glow_step, 5, warmup_batches=1),
    TransformCase("coupling_batchnorm", _coupling_batchnorm, 5, warmup_batches=5, batch_dependent=True),
    # Autoregressive layers (any order), every elementwise transformer, and splines in couplings.
    TransformCase("ar_affine", lambda c: MaskedAutoregressive(5, AffineElementwise(), c, SMALL, order=ORDER5), 5),
    TransformCase("ar_additive", lambda c: MaskedAutoregressive(5, AdditiveElementwise(), c, SMALL), 5),
    TransformCase("ar_spline", lambda c: MaskedAutoregressive(5, _spline(), c, SMALL, order=ORDER5), 5),
    TransformCase(
        "ar_spline_residual", lambda c: MaskedAutoregressive(5, _spline(), c, SMALL, residual=True, order=ORDER5), 5
    ),
    TransformCase("iaf_layer", lambda c: Invert(MaskedAutoregressive(5, AffineElementwise(), c, SMALL)), 5),
    TransformCase("coupling_spline", lambda c: Coupling(MASK5, _spline(), c, SMALL), 5),
    TransformCase("maf_stack", lambda c: MAF(5, c).transform, 5, randomize_scale=0.03),
    TransformCase("iaf_stack", lambda c: IAF(5, c).transform, 5, randomize_scale=0.03),
    TransformCase("nsf_stack", lambda c: NSF(5, c).transform, 5, randomize_scale=0.03),
    TransformCase("nsf_coupling_stack", lambda c: NSF(5, c, autoregressive=False).transform, 5, randomize_scale=0.03),
    # Residual blocks with the exact log-det (the series estimate is random; tests/test_residual.py).
    TransformCase("residual_block", lambda c: ResidualBlock(5, c, SMALL, logdet="exact"), 5),
    TransformCase(
        "residual_stack", lambda c: ResidualFlow(5, c, 3, SMALL, logdet="exact").transform, 5, warmup_batches=1
    ),
    TransformCase(
        "maf_lu_batchnorm_stack",
        lambda c: MAF(5, c, transforms=3, hidden=SMALL, mixing="lu", batch_norm=True).transform,
        5,
        warmup_batches=5,
        batch_dependent=True,
    ),
]


def _flow_with_mixture_base(context: int) -> Flow:
    transform = Compose(AffineCoupling([True, False], context, SMALL), AffineCoupling([False, True], context, SMALL))
    return Flow(GaussianMixture(2, components=3, seed=0), transform)


def _flow_with_context_net(context: int) -> Flow:
    """Raw context goes through an embedding net whose output (size 4) the couplings see."""
    if context == 0:
        return Flow(DiagNormal(3), Compose(AffineCoupling([True, False, True], 0, SMALL)))
    transform = Compose(AffineCoupling([True, False, True], 4, SMALL), AffineCoupling([False, True, False], 4, SMALL))
    return Flow(StandardNormal(3), transform, context_net=MLP(context, 4, hidden=(8,)))


def _glow_like_flow(context: int) -> Flow:
    """Two Glow steps on 2-D vectors, ActNorm initialised on data before the checks."""
    layers = []
    for i in range(2):
        mask = [i == 0, i == 1]
        layers += [ActNorm(2), LULinear(2, identity_init=False), AffineCoupling(mask, context, SMALL)]
    return warm_up_(Flow(StandardNormal(2), Compose(layers)), 2, context, batches=1)


FLOW_CASES = [
    FlowCase("realnvp_2d", lambda c: RealNVP(2, c, transforms=4, hidden=SMALL), 2),
    FlowCase("realnvp_5d", lambda c: RealNVP(5, c, transforms=4, hidden=SMALL), 5),
    FlowCase("nice_2d", lambda c: NICE(2, c, transforms=4, hidden=SMALL), 2),
    FlowCase("nice_5d", lambda c: NICE(5, c, transforms=4, hidden=SMALL), 5),
    FlowCase("mixture_base_2d", _flow_with_mixture_base, 2),
    FlowCase("context_net_3d", _flow_with_context_net, 3),
    FlowCase("glow_like_2d", _glow_like_flow, 2),
    FlowCase("maf_2d", lambda c: MAF(2, c, transforms=3, hidden=SMALL), 2),
    FlowCase("maf_5d_lu", lambda c: MAF(5, c, transforms=3, hidden=SMALL, mixing="lu"), 5),
    FlowCase("iaf_2d", lambda c: IAF(2, c, transforms=3, hidden=SMALL), 2),
    FlowCase("iaf_5d", lambda c: IAF(5, c, transforms=3, hidden=SMALL), 5),
    FlowCase("nsf_2d", lambda c: NSF(2, c, transforms=3, hidden=SMALL, bins=6, bound=4.0), 2),
    FlowCase("nsf_5d", lambda c: NSF(5, c, transforms=3, hidden=SMALL, bins=6, bound=4.0), 5),
    FlowCase("nsf_coupling_2d", lambda c: NSF(2, c, transforms=3, hidden=SMALL, autoregressive=False), 2),
    FlowCase(
        "residual_flow_2d",
        lambda c: warm_up_(ResidualFlow(2, c, 3, SMALL, logdet="exact"), 2, c, batches=1),
        2,
    ),
    # Fixed steps: an adaptive solver's step sizes depend on the whole batch, so a batch of one
    # would legitimately differ from the same row inside a batch.
    FlowCase(
        "cnf_3d",
        lambda c: CNF(3, c, hidden=(8, 8), method="rk4", steps=8),
        3,
        randomize_scale=0.2,
        float64_tolerance=1e-7,
    ),
]
