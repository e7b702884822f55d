"""RealNVP and NICE recipes: arguments, structure, and a trained density that still normalises."""

from __future__ import annotations

import json

import pytest
import torch

from flowforge.data import toy_dataset
from flowforge.distributions import DiagNormal, StandardNormal
from flowforge.flows import IAF, MAF, NICE, NSF, RealNVP
from flowforge.train import fit_maximum_likelihood
from flowforge.transforms import AdditiveCoupling, AffineCoupling, Permutation
from tests.invariants import density_mass_2d

RECIPES = [RealNVP, NICE]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("features", [1, 0, -3])
def test_too_few_features_is_a_clear_error(recipe, features: int) -> None:
    with pytest.raises(ValueError, match=r"features >= 2 \(a coupling splits"):
        recipe(features)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bad_arguments_are_refused(recipe) -> None:
    with pytest.raises(ValueError, match="context"):
        recipe(2, context=-1)
    with pytest.raises(ValueError, match="transforms"):
        recipe(2, transforms=0)
    with pytest.raises(ValueError, match="hidden"):
        recipe(2, hidden=(0,))


@pytest.mark.parametrize("recipe", [RealNVP, NICE, MAF, IAF, NSF])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transforms": True}, r"transforms must be an int in 1..1000, got True"),
        ({"transforms": 2.0}, r"transforms must be an int in 1..1000, got 2.0"),
        ({"hidden": [1.5]}, r"hidden widths must be positive ints, got \[1.5\]"),
        ({"hidden": "64"}, r"hidden must be a list of layer widths"),
        ({"context": 1.0}, r"context must be an int >= 0, got 1.0"),
    ],
)
def test_option_types_a_config_file_can_give_are_refused(recipe, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recipe(2, **options)


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_hidden_layers_make_linear_conditioners(recipe) -> None:
    flow = recipe(2, transforms=2, hidden=[])
    assert flow.log_prob(torch.randn(4, 2)).shape == (4,)


def test_realnvp_structure() -> None:
    flow = RealNVP(4, context=2, transforms=4, hidden=(8,))
    layers = list(flow.transform.transforms)
    couplings = [t for t in layers if isinstance(t, AffineCoupling)]
    assert len(couplings) == 4 and isinstance(flow.base, StandardNormal)
    # Masks alternate, and a permutation sits between the two pairs of couplings.
    assert [c.mask.tolist() for c in couplings[:2]] == [[True, False, True, False], [False, True, False, True]]
    assert sum(isinstance(t, Permutation) for t in layers) == 1
    assert all(c.context_features == 2 for c in couplings)
    assert flow.to_config() == {
        "__object__": "realnvp",
        "arguments": {
            "features": 4,
            "context": 2,
            "transforms": 4,
            "hidden": [8],
            "scale_bound": 3.0,
            "activation": {"__class__": "relu"},
            "seed": 0,
        },
    }


def test_nice_is_volume_preserving_with_a_learnable_base() -> None:
    flow = NICE(3, transforms=3, hidden=(8,))
    assert all(isinstance(t, AdditiveCoupling | Permutation) for t in flow.transform.transforms)
    assert isinstance(flow.base, DiagNormal) and flow.base.log_scale.requires_grad
    _, logabsdet = flow.transform(torch.randn(10, 3))
    assert torch.equal(logabsdet, torch.zeros(10))


@pytest.mark.parametrize(
    ("recipe", "options"),
    [
        (RealNVP, {"seed": 4}),
        (NICE, {}),
        (MAF, {"mixing": "lu", "batch_norm": True}),
        (IAF, {"residual": True}),
        (NSF, {"bins": 5, "bound": 2.0}),
        (NSF, {"autoregressive": False}),
    ],
)
def test_recipe_rebuilds_from_its_json_config(recipe, options: dict) -> None:
    flow = recipe(5, context=2, transforms=3, hidden=(8, 8), **options).eval()
    config = json.loads(json.dumps(flow.to_config()))
    rebuilt = recipe.from_config(config).eval()
    rebuilt.load_state_dict(flow.state_dict())
    x, c = torch.randn(6, 5), torch.randn(6, 2)
    torch.testing.assert_close(flow.log_prob(x, c), rebuilt.log_prob(x, c))


def test_fresh_flow_is_the_base_distribution() -> None:
    """Zero-initialised conditioners make a new RealNVP exactly N(0, I): stable deep stacks."""
    flow = RealNVP(3, transforms=16)
    x = torch.randn(8, 3)
    torch.testing.assert_close(flow.log_prob(x), StandardNormal(3).log_prob(x))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dataset", ["moons", "checkerboard"])
def test_trained_density_integrates_to_one(recipe, dataset: str) -> None:
    """A density shaped by training (sharp, multimodal), not only a random one, keeps unit mass."""
    torch.manual_seed(0)
    flow = recipe(2, transforms=4, hidden=(32, 32))
    losses = fit_maximum_likelihood(
        flow, toy_dataset(dataset, 4000), steps=200, batch_size=256, lr=3e-3, progress=False
    )
    assert losses[-1] < losses[0] - 0.3, "training did not make progress"
    mass = density_mass_2d(flow.double().log_prob, bound=6.0, resolution=400)
    assert abs(mass - 1.0) < 0.01, f"trained {recipe.__name__} density integrates to {mass:.4f}"
