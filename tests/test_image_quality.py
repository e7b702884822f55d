"""Image sample quality: the Fréchet distance against closed forms, the digits classifier (accuracy,
determinism, save/load, features), conditional accuracy, and the per-class sample grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from flowforge.data import digits_images
from flowforge.errors import CheckpointError
from flowforge.eval.image_quality import (
    DigitsClassifier,
    conditional_accuracy,
    frechet_classifier_distance,
    frechet_distance,
    gaussian_frechet_distance,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)
from flowforge.eval.plots import plot_class_grid


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run fastest on one thread, and far slower when threads compete for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    return train_digits_classifier()  # the defaults: 10-20 s on one core


def _with_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # identity sample covariance
    return mean + z @ torch.linalg.cholesky(cov).T


# ---------------------------------------------------------------- Fréchet distance
def test_frechet_distance_is_zero_for_identical_sets_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 1.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a[torch.randperm(300, generator=g)]) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0
    assert frechet_distance(a.float(), b.numpy()) == pytest.approx(frechet_distance(a, b), rel=1e-5)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((var_a.sqrt() - var_b.sqrt()) ** 2).sum() + ((mean_a - mean_b) ** 2).sum())  # 4 + 1 + 0 + 4.25
    assert expected == pytest.approx(9.25)
    assert gaussian_frechet_distance(mean_a, var_a.diag(), mean_b, var_b.diag()) == pytest.approx(expected, rel=1e-12)
    a = _with_moments(400, mean_a, var_a.diag(), seed=1)
    b = _with_moments(250, mean_b.double(), var_b.double().diag(), seed=2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances() -> None:
    rng = np.random.default_rng(0)
    d = 6
    factors = rng.normal(size=(2, d, d))
    cov_a, cov_b = (f @ f.T + 0.1 * np.eye(d) for f in factors)
    mean_a, mean_b = rng.normal(size=(2, d))
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)
    a = _with_moments(100, torch.as_tensor(mean_a), torch.as_tensor(cov_a), seed=3)
    b = _with_moments(100, torch.as_tensor(mean_b), torch.as_tensor(cov_b), seed=4)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_stays_real_with_singular_covariances() -> None:
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(10, 64, generator=g), torch.randn(12, 64, generator=g) + 0.1  # fewer rows than features
    distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0


@pytest.mark.parametrize(
    ("a", "b", "error", "message"),
    [
        (torch.zeros(1, 3), torch.zeros(5, 3), ValueError, r"features_a has 1 row\(s\); a covariance needs at least 2"),
        (torch.zeros(5, 3), torch.zeros(5), ValueError, r"features_b must have shape \(n, d\)"),
        (torch.zeros(5, 3), torch.zeros(5, 4), ValueError, "the same width d, got 3 and 4"),
        (torch.full((4, 2), float("nan")), torch.zeros(4, 2), ValueError, "features_a contains NaN or inf"),
        ([[0.0, 1.0], [1.0, 0.0]], torch.zeros(4, 2), TypeError, "features_a must be a torch.Tensor or numpy array"),
        (torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, 2), TypeError, "must hold real numbers"),
    ],
)
def test_frechet_distance_refuses_bad_feature_sets(a, b, error, message) -> None:
    with pytest.raises(error, match=message):
        frechet_distance(a, b)


def test_gaussian_frechet_distance_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"cov_b must have shape \(2, 2\)"):
        gaussian_frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))


# ---------------------------------------------------------------- the digits classifier
def test_the_classifier_reaches_95_percent_on_the_digits_test_split(trained) -> None:
    assert trained.test_accuracy > 0.95, trained
    assert trained.train_accuracy > 0.95
    assert not trained.classifier.training
    test_x, test_y = digits_images("test")
    one_hot = torch.eye(10)[test_y]
    assert conditional_accuracy(trained.classifier, test_x, one_hot) == trained.test_accuracy
    assert conditional_accuracy(trained.classifier, test_x.double(), test_y) == pytest.approx(trained.test_accuracy)


def test_training_is_deterministic_and_leaves_the_global_random_state_alone() -> None:
    state = torch.get_rng_state()
    first = train_digits_classifier(epochs=1, seed=3, channels=4, hidden=8)
    assert torch.equal(torch.get_rng_state(), state)
    second = train_digits_classifier(epochs=1, seed=3, channels=4, hidden=8)
    other = train_digits_classifier(epochs=1, seed=4, channels=4, hidden=8)
    for name, weight in first.classifier.state_dict().items():
        assert torch.equal(weight, second.classifier.state_dict()[name]), name
    assert not torch.equal(first.classifier.head.weight, other.classifier.head.weight)


def test_the_classifier_saves_and_loads_as_a_checkpoint(trained, tmp_path: Path) -> None:
    directory = save_classifier(trained.classifier, tmp_path / "classifier", trained.metadata())
    assert sorted(p.suffix for p in directory.iterdir()) == [".json", ".safetensors"]
    manifest = json.loads((directory / "checkpoint.json").read_text())
    assert manifest["metadata"]["test_accuracy"] == trained.test_accuracy
    loaded = load_classifier(directory)
    assert isinstance(loaded, DigitsClassifier) and not loaded.training
    x = digits_images("test")[0][:50]
    torch.testing.assert_close(loaded.features(x), trained.classifier.features(x), rtol=0, atol=0)
    from flowforge.checkpoint import save_model
    from flowforge.nn import UNetVelocity

    save_model(tmp_path / "unet", UNetVelocity((1, 8, 8), channels=8, groups=4))
    with pytest.raises(CheckpointError, match="not a DigitsClassifier"):
        load_classifier(tmp_path / "unet")
    with pytest.raises(TypeError, match="must be a DigitsClassifier"):
        save_classifier(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_features_separate_real_digits_from_noise(trained) -> None:
    classifier = trained.classifier
    train_x = digits_images("train")[0][:359]
    test_x = digits_images("test")[0]
    assert classifier.features(test_x[:7]).shape == (7, 128)
    noise = torch.rand(359, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 16
    real = frechet_classifier_distance(classifier, train_x, test_x)
    fake = frechet_classifier_distance(classifier, noise, test_x)
    assert 0 < real < fake / 10, (real, fake)


def test_conditional_accuracy_counts_samples_labelled_with_their_class(trained) -> None:
    x = digits_images("test")[0]
    predicted = trained.classifier.predict(x)
    assert conditional_accuracy(trained.classifier, x, predicted) == 1.0
    assert conditional_accuracy(trained.classifier, x, (predicted + 1) % 10) == 0.0
    mixed = torch.cat([predicted[:100], (predicted[100:200] + 1) % 10, predicted[200:300]])
    assert conditional_accuracy(trained.classifier, x[:300], mixed) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("samples", "labels", "error", "message"),
    [
        (
            torch.zeros(4, 64),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            r"samples must have shape \(batch, 1, 8, 8\)",
        ),
        (torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), ValueError, r"labels must have shape \(4,\)"),
        (torch.zeros(4, 1, 8, 8), torch.full((4,), 10), ValueError, r"labels must lie in 0\.\.9, got 10\.\.10"),
        (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), ValueError, "0 rows"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.zeros(2), TypeError, "floating-point"),
        (torch.zeros(2, 1, 8, 8), [0, 1], TypeError, r"labels must be a torch.Tensor of shape \(2,\)"),
    ],
)
def test_conditional_accuracy_refuses_bad_inputs(samples, labels, error, message) -> None:
    with pytest.raises(error, match=message):
        conditional_accuracy(DigitsClassifier(channels=4, hidden=8), samples, labels)


# ---------------------------------------------------------------- the per-class grid
def test_plot_class_grid_draws_every_input_form(tmp_path: Path) -> None:
    x, y = digits_images("test")
    by_labels = plot_class_grid(x, y, tmp_path / "labels.png", value_range=(0, 16), title="digits")
    per_class = [x[y == k][:5] for k in range(10)]
    by_list = plot_class_grid(per_class, None, tmp_path / "list.png", columns=5)
    drawn = torch.randn(3, 4, 3, 8, 8)  # FlowMatcher.sample(3, context of 4 rows), RGB
    by_context = plot_class_grid(drawn, None, tmp_path / "context.png", class_names=["a", "b", "c", "d"])
    for path in (by_labels, by_list, by_context):
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_hot = plot_class_grid(x[:20], torch.eye(10)[y[:20]], tmp_path / "onehot.png")
    assert one_hot.is_file()


@pytest.mark.parametrize(
    ("samples", "labels", "message"),
    [
        (torch.zeros(4, 1, 8, 8), None, r"without labels, samples must have shape \(n, classes, C, H, W\)"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(3), r"labels must have shape \(4,\)"),
        (torch.zeros(4, 2, 8, 8), torch.zeros(4), "1 or 3 channels"),
        ([torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4)], None, r"samples\[1\] must be a tensor of shape"),
        ([torch.zeros(2, 1, 8, 8)], torch.zeros(2), "labels must be None"),
    ],
)
def test_plot_class_grid_refuses_bad_inputs(samples, labels, message, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        plot_class_grid(samples, labels, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_covariances_and_classifier_sizes_that_are_not_what_they_claim_are_refused() -> None:
    eye = torch.eye(2)
    for cov, message in ((-eye, "positive semi-definite"), (torch.tensor([[1.0, 0.3], [0.0, 1.0]]), "symmetric")):
        with pytest.raises(ValueError, match=message):
            gaussian_frechet_distance(torch.zeros(2), cov, torch.zeros(2), eye)
    for arguments, message in (
        ({"shape": (1, 8.9, 8)}, r"shape must be \(C, H, W\) of positive ints"),
        ({"shape": "188"}, r"shape must be \(C, H, W\) of positive ints"),
        ({"levels": 2.5}, "levels must be an int >= 2, got 2.5"),
        ({"classes": 2.5}, "classes must be an int >= 2"),
        ({"hidden": True}, "hidden must be a positive int"),
    ):
        with pytest.raises(ValueError, match=message):
            DigitsClassifier(**arguments)
    features = torch.randn(50, 64)  # fewer samples than features, in float32: round-off eigenvalues < 0
    cov = torch.cov(features.T)
    assert gaussian_frechet_distance(features.mean(0), cov, features.mean(0), cov) < 1e-3
    classifier = DigitsClassifier()
    samples = torch.rand(6, 1, 8, 8) * 16
    one_hot = torch.nn.functional.one_hot(torch.arange(6) % 10, 10)  # integer one-hot rows
    by_class = conditional_accuracy(classifier, samples, one_hot.argmax(1))
    assert conditional_accuracy(classifier, samples, one_hot) == by_class
