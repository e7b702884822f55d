"""The rebuild contract: every registered model saves every constructor argument and reloads exactly.

For each registered model, part and policy, the constructions below give every constructor
argument a value other than its default (checked: a new argument that no case changes fails the
coverage test). Weights are moved off their initial values, the model is saved to a checkpoint,
reloaded from the registry config alone, and its outputs are compared with the original's.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import flowforge.policy  # noqa: F401 - registers the policies
from flowforge import registry
from flowforge.checkpoint import load_model, save_model
from flowforge.errors import CheckpointError, RebuildError
from flowforge.flows import CNF, IAF, MAF, NICE, NSF, Dequantized, Glow, MultiscaleRealNVP, RealNVP, ResidualFlow
from flowforge.flows.vae import VAE
from flowforge.matching import (
    ConsistencyMatcher,
    CosinePath,
    ExactOTCoupling,
    FlowMatcher,
    IndependentCoupling,
    LinearPath,
    LogitNormalTime,
    MeanFlowMatcher,
    ShiftedBetaTime,
    ShortcutMatcher,
    SinkhornCoupling,
    StochasticInterpolantPath,
    UniformTime,
    VariancePreservingPath,
)
from flowforge.nn import ResidualVelocityMLP, UNetVelocity, VelocityMLP
from flowforge.policy import PolicyConfig
from flowforge.runs.policy import load_policy

# name -> constructions whose arguments, together, differ from every default.
CASES: dict[str, list] = {
    "realnvp": [lambda: RealNVP(3, 2, 3, (8, 7), scale_bound=2.0, activation=nn.Tanh, seed=5)],
    "nice": [lambda: NICE(3, 2, 3, (8,), activation=nn.GELU, seed=2)],
    "maf": [
        lambda: MAF(3, 2, 3, (8, 8), residual=True, mixing="lu", batch_norm=True, scale_bound=2.0, activation=nn.ELU)
    ],
    "iaf": [
        lambda: IAF(3, 2, 2, (8, 8), residual=True, mixing="lu", scale_bound=2.5, activation=nn.Tanh),
    ],
    "nsf": [
        lambda: NSF(3, 2, 3, (8,), bins=5, bound=3.0, autoregressive=False, activation=nn.SiLU, seed=4),
        lambda: NSF(3, 2, 2, (8, 8), bins=4, residual=True, mixing="lu"),
    ],
    "cnf": [
        lambda: CNF(2, 2, (8,), trace="hutchinson", method="bosh3", atol=1e-4, rtol=1e-4, adjoint=True),
        lambda: CNF(2, hidden=(8,), method="rk4", steps=3),
    ],
    "residual": [lambda: ResidualFlow(2, 2, 2, (8,), coefficient=0.9, logdet="exact", actnorm=False)],
    "glow": [lambda: Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4, context=2, scale_bound=2.0)],
    "multiscale-realnvp": [
        lambda: MultiscaleRealNVP((1, 4, 4), levels=1, steps=1, hidden_channels=4, context=2, scale_bound=2.0)
    ],
    "dequantized": [lambda: Dequantized(Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4), 5, True, hidden=4)],
    "flow-matching": [
        lambda: FlowMatcher(
            ResidualVelocityMLP(2, 2, width=8, blocks=1, activation=nn.Tanh, time_embedding=4, step_input=True),
            CosinePath(),
            SinkhornCoupling(reg=0.1, per_condition=False, seed=7),
            LogitNormalTime(0.5, 2.0),
            event_shape=2,
            context=2,
            context_dropout=0.1,
        ),
        lambda: FlowMatcher(
            UNetVelocity(
                (2, 4, 4),
                context=3,
                channels=8,
                channel_multipliers=(1, 2, 2),
                blocks=2,
                attention=True,
                heads=2,
                groups=4,
                time_embedding=8,
                dropout=0.1,
                step_input=True,
            ),
            context_dropout=0.2,
        ),
    ],
    "shortcut": [
        lambda: ShortcutMatcher(
            VelocityMLP(2, 2, (8,), activation=nn.Tanh, time_embedding=4, step_input=True),
            VariancePreservingPath(beta_min=0.2, beta_max=10.0, s_min=1e-4),
            ExactOTCoupling(per_condition=False),
            self_consistency_fraction=0.5,
            max_halvings=3,
            time_sampler=ShiftedBetaTime(2.0, 1.5, 0.99),
        ),
        lambda: ShortcutMatcher(
            VelocityMLP(2, hidden=(8,), step_input=True),
            StochasticInterpolantPath(LinearPath(sigma_min=0.01), gamma_scale=0.5),
            IndependentCoupling(),
            UniformTime(),
        ),
    ],
    "meanflow": [
        lambda: MeanFlowMatcher(
            VelocityMLP(2, 2, (8,), time_embedding=4, step_input=True),
            context_dropout=0.2,
            span_fraction=0.5,
            adaptive_power=0.5,
            guidance_scale=2.0,
        ),
    ],
    "vae": [
        lambda: VAE(
            3,
            2,
            (8,),
            "spline",
            2,
            (8,),
            3,
            bins=5,
            bound=2.0,
            prior="nsf",
            prior_transforms=2,
            prior_hidden=(8,),
            likelihood="logistic",
            levels=9,
            activation=nn.Tanh,
            decoder_dropout=0.1,
        ),
        lambda: VAE(3, 2, (), "iaf", prior="maf", likelihood="gaussian"),
        lambda: VAE(4, 2, (8,), "coupling", 3, prior="realnvp", likelihood="gaussian"),
    ],
    "consistency": [
        lambda: ConsistencyMatcher(
            VelocityMLP(2, 2, (8,), time_embedding=4),
            total_steps=50,
            initial_intervals=4,
            final_intervals=32,
            sigma_min=0.01,
            sigma_max=40.0,
            rho=5.0,
            time_mean=-0.5,
            time_std=1.5,
            huber_constant=0.01,
            distillation_intervals=8,
        ),
    ],
}
# Arguments left at their defaults on purpose: a torch.Generator cannot be stored (refused with a message,
# tested below), and IAF refuses batch_norm=True (its sampling direction would invert BatchNorm).
EXEMPT = {("sinkhorn", "generator"), ("iaf", "batch_norm")}


#: Each head's own non-default settings (a config refuses another head's).
_FLOW_SAMPLING = dict(sampling_steps=4, method="midpoint", noise_scale=0.5)
_OWN_SETTINGS = {
    "flow": dict(
        _FLOW_SAMPLING, rtc_training_delay=3, rtc_prefix_noise=0.2, rtc_unprefixed_fraction=0.5, prediction="sample"
    ),
    "hierarchical": dict(_FLOW_SAMPLING, keyframe_stride=2, time_sampler="logit-normal"),
    "mse": {},
    "ddpm": dict(diffusion_steps=12, inference_steps=3, sampler="ddpm"),
    "shortcut": dict(
        sampling_steps=2, noise_scale=0.5, shortcut_fraction=0.3, shortcut_halvings=5, time_sampler="uniform"
    ),
    "meanflow": dict(sampling_steps=2, meanflow_fraction=0.5, meanflow_adaptive_power=0.25),
    "consistency": dict(
        sampling_steps=2, consistency_delta=0.1, consistency_velocity_weight=0.5, consistency_segments=3
    ),
}


def _policy_case(kind: str, **changes):
    def build():
        settings = dict(
            kind=kind,
            state_key="observation.state",
            state_dim=5,
            action_dim=3,
            horizon=8,
            obs_horizon=2,
            n_action_steps=3,
            width=16,
            layers=1,
            heads=2,
            image_shape=[3, 48, 48],
            language=True,
            instructions=["reach the goal", "open the drawer"],
            state_normalization="min_max",
            action_normalization="mean_std",
            **_OWN_SETTINGS[kind],
        )
        if kind != "mse":  # the regression head embeds no flow time
            settings["time_embedding_frequency"] = 4.0
        settings.update(changes)
        policy = registry.lookup("policy", "chunk-policy")(PolicyConfig(**settings))
        if settings["language"]:
            policy.set_instruction_embeddings(torch.nn.functional.normalize(torch.randn(2, 384), dim=1))
        return policy

    return build


POLICY_CASES = {
    "flow": _policy_case("flow"),
    "hierarchical": _policy_case("hierarchical"),
    "mse": _policy_case("mse", language=False, instructions=[]),
    "ddpm": _policy_case("ddpm"),
    "shortcut": _policy_case("shortcut"),
    "meanflow": _policy_case("meanflow"),
    "consistency": _policy_case("consistency"),
    "flow-vision": _policy_case(
        "flow",
        previous_state=True,
        goal_key="observation.goal",
        cameras=["gripperPOV"],
        image_encoder="resnet-keypoints",
        keypoints=6,
        image_channels=[4, 8],
        augmentation="crop",
        augmentation_pixels=3,
        color_jitter=0.2,
        image_normalization="mean_std",
    ),
}


def _every_registered() -> list[tuple[str, str]]:
    categories = ("model", "velocity", "path", "coupling", "time")
    return [(category, name) for category in categories for name in registry.names(category)]


def _instances(value, found: list) -> None:
    """Every registered object inside ``value`` (recursively through the recorded arguments)."""
    if registry.name_of(value) is not None and not isinstance(value, type):
        found.append(value)
        recorded = getattr(value, "_rebuild_arguments", None)
        if recorded is not None:
            for argument in recorded[1].values():
                _instances(argument, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _instances(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _instances(item, found)


def test_the_cases_change_every_argument_of_every_registered_class() -> None:
    built: list = []
    for constructions in CASES.values():
        for construct in constructions:
            _instances(construct(), built)
    changed: dict[type, set[str]] = {}
    for obj in built:
        signature, arguments = obj._rebuild_arguments
        for name, parameter in signature.parameters.items():
            if name == "self" or name not in arguments:
                continue
            value = arguments[name]
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                differs = bool(value)
            else:
                differs = parameter.default is inspect.Parameter.empty or not _same(value, parameter.default)
            if differs:
                changed.setdefault(type(obj), set()).add(name)
    missing = []
    for category, name in _every_registered():
        cls = registry.lookup(category, name)
        parameters = [
            p.name
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        for parameter in parameters:
            if parameter not in changed.get(cls, set()) and (name, parameter) not in EXEMPT:
                missing.append(f"{category} {name}: {parameter}")
    assert not missing, f"no case gives these arguments a non-default value: {missing}"


def _same(value, default) -> bool:
    if isinstance(value, tuple | list) and isinstance(default, tuple | list):
        return list(value) == list(default)
    if isinstance(default, type) or default is None:
        return value is default
    try:
        return bool(value == default)
    except (TypeError, RuntimeError):
        return False


def test_every_policy_config_field_is_changed_by_some_case() -> None:
    defaults = PolicyConfig()
    configs = [build().policy_config for build in POLICY_CASES.values()]
    unchanged = [
        f.name
        for f in dataclasses.fields(PolicyConfig)
        if all(getattr(config, f.name) == getattr(defaults, f.name) for config in configs)
    ]
    assert unchanged == [], unchanged


def _randomize(model: nn.Module) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _outputs(model: nn.Module) -> list[torch.Tensor]:
    """Outputs that depend on every weight, under a fixed seed (some models draw noise)."""
    torch.manual_seed(7)
    event = tuple(getattr(model, "event_shape", (2,)))
    context_size = getattr(model, "context_features", 0) or 0
    if isinstance(model, Dequantized) or getattr(model, "discrete", False):  # counts (a VAE's discrete decoder)
        x = torch.randint(0, model.levels, (3, *event)).double()
        return [model.log_prob(x)]
    context = torch.randn(3, context_size, dtype=torch.float64) if context_size else None
    if isinstance(model, FlowMatcher):
        x = torch.randn(3, *event, dtype=torch.float64)
        t = torch.rand(3, dtype=torch.float64)
        return [model.velocity(x, t, context), model.loss(x, context)]  # the network itself (any family)
    x = torch.randn(3, *event, dtype=torch.float64) * 0.3 + 0.5
    return [model.log_prob(x, context)]


@pytest.mark.parametrize(
    "construct",
    [c for constructions in CASES.values() for c in constructions],
    ids=[f"{name}-{i}" for name, constructions in CASES.items() for i in range(len(constructions))],
)
def test_every_registered_model_reloads_with_every_argument(construct, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = construct().double()
    _randomize(model)
    model.eval()
    save_model(tmp_path / "ckpt", model)
    manifest = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert manifest["model"] == registry.to_config(model)  # plain JSON, nothing pickled
    loaded = load_model(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    assert registry.to_config(loaded) == registry.to_config(model)
    for before, after in zip(_outputs(model), _outputs(loaded), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(POLICY_CASES))
def test_every_policy_reloads_with_every_config_field(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = POLICY_CASES[kind]()
    _randomize(policy)
    policy.eval()
    save_model(tmp_path / "policy", policy)
    loaded = load_policy(tmp_path / "policy")
    assert loaded.policy_config == policy.policy_config
    g = torch.Generator().manual_seed(3)
    batch = {
        "state": torch.randn(2, 2, 5, generator=g),
        "image": torch.randint(0, 256, (2, 2, 3, 48, 48), generator=g, dtype=torch.uint8),
        "task_index": torch.tensor([0, 1]),
    }
    torch.manual_seed(5)
    expected = policy.predict_chunk(batch).actions
    torch.manual_seed(5)
    torch.testing.assert_close(loaded.predict_chunk(batch).actions, expected, rtol=0, atol=0)


def test_an_unregistered_argument_is_refused_at_save_time_naming_it(tmp_path: Path) -> None:
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    flow = RealNVP(2, transforms=2, hidden=(8,), activation=Swish)
    with pytest.raises(RebuildError, match=r"argument RealNVP\.activation is the class .*Swish.*no registered name"):
        flow.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_hand_built_flow_is_refused_with_a_message(tmp_path: Path) -> None:
    from flowforge.distributions import StandardNormal
    from flowforge.flows import Flow
    from flowforge.transforms import AffineCoupling

    flow = Flow(StandardNormal(2), AffineCoupling([True, False]))
    with pytest.raises(RebuildError, match="class is not registered"):
        flow.save(tmp_path / "hand")


def test_a_config_naming_an_unknown_class_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="'glow9', which is not a registered name"):
        registry.from_config({"__object__": "glow9", "arguments": {}})
    with pytest.raises(CheckpointError, match="takes no argument"):
        registry.from_config({"__object__": "realnvp", "arguments": {"features": 2, "colour": 3}})
    with pytest.raises(CheckpointError, match="does not build a RealNVP"):
        registry.from_config({"__object__": "realnvp", "arguments": {"features": "two"}})


def test_lookup_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'realnpv' \(did you mean 'realnvp'\?\)"):
        registry.lookup("model", "realnpv")
