"""Flow matching on the 8x8 digits through the runs layer: the scaling of pixel counts, class
conditioning, the U-Net the run builds for every family, sampling in counts and the cached classifier."""

from __future__ import annotations

import pytest
import torch

from flowforge import runs
from flowforge.errors import ConfigError, DataError
from flowforge.eval.image_quality import train_digits_classifier
from flowforge.matching import ConsistencyMatcher, FlowMatcher
from flowforge.nn import UNetVelocity
from flowforge.runs import density
from flowforge.train import TrainerConfig

SMALL_UNET = {"channels": 8, "groups": 4, "time_embedding": 16}


def _config(kind: str = "flow-matching", conditional: bool = True, steps: int = 7, **options) -> runs.RunConfig:
    return runs.RunConfig(
        model=runs.ModelConfig(kind=kind, options={**SMALL_UNET, **options}),
        data=runs.DataConfig(name="digits-images", conditional=conditional),
        train=TrainerConfig(steps=steps, batch_size=16, log_every=1),
    )


@pytest.fixture
def quick_classifier(tmp_path, monkeypatch):
    """Evaluation's classifier cache in a temporary folder, filled by a one-epoch classifier."""
    calls = []

    def quick(**kwargs):
        calls.append(kwargs)
        return train_digits_classifier(epochs=1, **kwargs)

    monkeypatch.setenv(density.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(density, "train_digits_classifier", quick)
    return calls


# ---------------------------------------------------------------- the scaling
def test_counts_go_to_model_units_and_back_for_every_noise() -> None:
    counts = torch.arange(17, dtype=torch.float64).repeat(50)
    for noise in (torch.zeros_like(counts), torch.rand_like(counts), torch.full_like(counts, 1 - 1e-9)):
        y = runs.counts_to_model_units(counts, 17, noise)
        assert float(y.min()) >= -1.0 and float(y.max()) < 1.0
        assert torch.equal(runs.model_units_to_counts(y, 17), counts)
    fresh = runs.counts_to_model_units(counts, 17)
    assert not torch.equal(fresh, runs.counts_to_model_units(counts, 17))  # a new draw each call
    # Samples outside [-1, 1) are clamped to the extreme counts, and come back as whole numbers.
    assert runs.model_units_to_counts(torch.tensor([-3.0, 2.5, 0.0]), 17).tolist() == [0.0, 16.0, 8.0]


def test_the_objective_dequantizes_every_batch_afresh() -> None:
    seen = []

    class Recorder(torch.nn.Module):
        def loss(self, x, context=None):
            seen.append((x.clone(), context))
            return x.sum()

    counts = torch.randint(0, 17, (6, 1, 8, 8)).float()
    context = torch.eye(10)[:6]
    objective = runs.DequantizedFlowMatching(17)
    objective.loss(Recorder(), (counts, context))
    objective.loss(Recorder(), (counts, context))
    (first, c1), (second, _) = seen
    assert c1 is context and not torch.equal(first, second)
    for y in (first, second):
        assert float(y.min()) >= -1 and float(y.max()) < 1
        assert torch.equal(runs.model_units_to_counts(y, 17), counts)


# ---------------------------------------------------------------- data and models
def test_conditional_digits_carry_one_hot_classes() -> None:
    from flowforge.data import digits_images

    data = runs.load_data(runs.DataConfig(name="digits-images", conditional=True))
    _, labels = digits_images("train")
    assert data.train_context.shape == (data.train.shape[0], 10) and data.context_features == 10
    assert torch.equal(data.train_context.argmax(1), labels)
    assert data.test_context.shape == (data.test.shape[0], 10)
    assert torch.equal(data.train, data.train.round())  # counts stay counts
    plain = runs.load_data(runs.DataConfig(name="digits-images"))
    assert plain.train_context is None and plain.context_features == 0


@pytest.mark.parametrize("kind", ["flow-matching", "shortcut", "meanflow", "consistency"])
def test_every_family_gets_a_unet_with_the_class_context(kind: str) -> None:
    config = _config(kind, context_dropout=0.1)
    data = runs.load_data(config.data)
    model = runs.build_model(config, data)
    assert isinstance(model, FlowMatcher) and isinstance(model.velocity, UNetVelocity)
    assert model.velocity.features == (1, 8, 8) and model.context_features == 10
    assert model.velocity.step_input == (kind in runs.STEP_INPUT_MODELS)
    assert model.context_dropout == 0.1
    if kind == "consistency":
        assert isinstance(model, ConsistencyMatcher) and model.total_steps == config.train.steps
    x = runs.counts_to_model_units(data.train[:4], 17)
    assert torch.isfinite(model.loss(x, data.train_context[:4]))


def test_an_unconditional_image_run_has_no_context() -> None:
    config = _config(conditional=False)
    model = runs.build_model(config, runs.load_data(config.data))
    assert model.context_features == 0 and model.velocity.context_features == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"velocity": "velocity-mlp"}, "options.velocity = 'velocity-mlp': images (1, 8, 8) take velocity = 'unet'"),
        ({"velocity": "unet9"}, "options.velocity"),
        ({"context": 3}, "options.context: set by the run from [data] conditional"),
        ({"step_input": True}, "options.step_input: set by the run"),
        ({"hidden": [64]}, "do not build a flow-matching model"),
        ({"channels": 6, "groups": 4}, "do not build a flow-matching model"),
    ],
)
def test_bad_image_model_options_are_config_errors(change: dict, message: str) -> None:
    config = _config(**change)
    with pytest.raises(ConfigError) as caught:
        runs.build_model(config, runs.load_data(config.data))
    assert message in str(caught.value)


def test_conditioning_needs_labels_and_a_matching_model() -> None:
    with pytest.raises(ConfigError, match="conditional = true: name = 'moons' has no class labels"):
        runs.DataConfig(name="moons", conditional=True)
    with pytest.raises(ConfigError, match="conditional = true: name = 'digits' has no class labels"):
        runs.DataConfig(name="digits", conditional=True)
    with pytest.raises(ConfigError, match="kind = 'glow' takes no class context"):
        runs.RunConfig(
            model=runs.ModelConfig(kind="glow"), data=runs.DataConfig(name="digits-images", conditional=True)
        )


def test_a_unet_on_vectors_is_refused() -> None:
    config = runs.RunConfig(
        model=runs.ModelConfig(kind="flow-matching", options={"velocity": "unet"}), data=runs.DataConfig(name="moons")
    )
    with pytest.raises(ConfigError, match="vectors \\(2,\\) take velocity = 'velocity-mlp'"):
        runs.build_model(config, runs.load_data(config.data))


# ---------------------------------------------------------------- trained runs
def _trained(tmp_path, kind: str = "flow-matching", conditional: bool = True) -> runs.Run:
    prepared = runs.prepare_run(
        _config(kind, conditional=conditional, context_dropout=0.1 if conditional else 0.0), tmp_path / kind
    )
    return runs.train_run(prepared)


def test_samples_leave_a_run_as_counts_of_the_classes_asked_for(tmp_path) -> None:
    run = _trained(tmp_path, "meanflow")
    torch.manual_seed(0)
    drawn = runs.draw_samples(run, 13, steps=1)
    assert drawn.shape == (13, 1, 8, 8) and torch.equal(drawn, drawn.round())
    assert float(drawn.min()) >= 0 and float(drawn.max()) <= 16
    # The classes go in turn by default: the same draws as asking for them explicitly.
    torch.manual_seed(0)
    assert torch.equal(runs.draw_samples(run, 13, steps=1, labels=runs.balanced_labels(13, 10)), drawn)
    assert runs.draw_samples(run, 3, steps=2, labels=7).shape == (3, 1, 8, 8)
    with pytest.raises(DataError, match=r"expected classes 0\.\.9"):
        runs.draw_samples(run, 2, labels=torch.tensor([0, 10]))
    with pytest.raises(DataError, match="expected 2 class numbers"):
        runs.draw_samples(run, 2, labels=torch.tensor([0.0, 1.0]))


def test_a_one_off_draw_runs_its_solve_eagerly(tmp_path) -> None:
    from flowforge.matching import matcher

    run = _trained(tmp_path, "flow-matching")
    assert runs.draw_samples(run, 4, steps=3).shape == (4, 1, 8, 8)
    # Traced only when the signature comes back: a U-Net's trace costs several solves.
    assert not any(callable(v) for v in matcher._TRACED.get(run.model.velocity, {}).values())


def test_an_unconditional_run_refuses_labels(tmp_path) -> None:
    run = _trained(tmp_path, "consistency", conditional=False)
    assert runs.draw_samples(run, 4, steps=2).shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="not class-conditional"):
        runs.draw_samples(run, 4, labels=3)


def test_evaluation_trains_the_classifier_once_and_reports_image_metrics(tmp_path, quick_classifier) -> None:
    run = _trained(tmp_path, "shortcut")
    data = runs.load_data(run.config.data)
    metrics = runs.evaluate_run(run, data.test_units, samples=60, steps=2)
    assert set(metrics) == {
        "frechet_distance",
        "frechet_distance_floor",
        "conditional_accuracy",
        "classifier_accuracy",
    }
    assert metrics["frechet_distance"] > metrics["frechet_distance_floor"] > 0  # an untrained model is far off
    assert 0 <= metrics["conditional_accuracy"] <= 1
    assert len(quick_classifier) == 1 and quick_classifier[0] == {"test_fraction": 0.2, "split_seed": 0}
    folder = runs.classifier_cache() / "digits-classifier-test0.2-seed0"
    assert (folder / "checkpoint.json").is_file()
    again = runs.evaluate_run(run, data.test_units, samples=60, steps=2)
    assert len(quick_classifier) == 1  # loaded from the cache, not trained again
    assert again["classifier_accuracy"] == metrics["classifier_accuracy"]
    assert again["frechet_distance_floor"] == metrics["frechet_distance_floor"]
    # A damaged cached copy is trained again rather than failing the evaluation.
    next(folder.glob("*.safetensors")).write_bytes(b"broken")
    runs.evaluate_run(run, data.test_units, samples=20)
    assert len(quick_classifier) == 2
    with pytest.raises(DataError, match="8x8 digit images"):
        runs.evaluate_run(run, torch.zeros(10, 2))


def test_flow_matching_on_flat_digit_counts_uses_the_same_scaling(tmp_path, quick_classifier) -> None:
    config = runs.RunConfig(
        model=runs.ModelConfig(kind="flow-matching", options={"hidden": [16]}),
        data=runs.DataConfig(name="digits"),
        train=TrainerConfig(steps=3, batch_size=16),
    )
    run = runs.train_run(runs.prepare_run(config, tmp_path / "flat"))
    drawn = runs.draw_samples(run, 5, steps=2)
    assert drawn.shape == (5, 64) and torch.equal(drawn, drawn.round()) and float(drawn.max()) <= 16
    data = runs.load_data(config.data)
    assert set(runs.evaluate_run(run, data.test_units, samples=30, steps=1)) == {
        "frechet_distance",
        "frechet_distance_floor",
        "classifier_accuracy",
    }


def test_the_classifier_cache_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(density.CACHE_VARIABLE, str(tmp_path / "a"))
    assert runs.classifier_cache() == tmp_path / "a"
    monkeypatch.delenv(density.CACHE_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runs.classifier_cache() == tmp_path / "xdg" / "flowforge"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(density.CACHE_VARIABLE, str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match=r"file is a file; set \$FLOWFORGE_CACHE to a folder"):
        density.digits_classifier(runs.DataConfig(name="digits-images"))  # before a classifier is trained
