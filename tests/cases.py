"""Every transform and flow of the package, registered with the invariant harness.

A new transform or recipe is added here once; the harness tests then check it in float32 and
float64, with and without a context.
"""

from __future__ import annotations

import torch

from flowforge.distributions import DiagNormal, GaussianMixture, StandardNormal
from flowforge.flows import NICE, Flow, RealNVP
from flowforge.nn import MLP
from flowforge.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    Compose,
    Invert,
    Permutation,
)
from tests.invariants import FlowCase, TransformCase

SMALL = (16, 16)
MASK5 = torch.tensor([True, False, False, True, False])


def _coupling_chain(context: int) -> Compose:
    return Compose(
        AffineCoupling(MASK5, context, SMALL),
        Permutation.random(5, seed=3),
        AdditiveCoupling(~MASK5, context, SMALL),
        Permutation.reverse(5),
        AffineCoupling(MASK5, context, SMALL, scale_bound=1.0),
    )


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


FLOW_CASES = [
    FlowCase("realnvp_2d", lambda c: RealNVP(2, c, transforms=4, hidden=SMALL), 2),
    FlowCase("realnvp_5d", lambda c: RealNVP(5, c, transforms=4, hidden=SMALL), 5),
    FlowCase("nice_2d", lambda c: NICE(2, c, transforms=4, hidden=SMALL), 2),
    FlowCase("nice_5d", lambda c: NICE(5, c, transforms=4, hidden=SMALL), 5),
    FlowCase("mixture_base_2d", _flow_with_mixture_base, 2),
    FlowCase("context_net_3d", _flow_with_context_net, 3),
]
