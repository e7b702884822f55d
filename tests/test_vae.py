"""VAEs with flow posteriors: the bounds against a closed-form log p(x), the flow posterior's density,
gradients, the rebuild round trip, the objective, and the input checks. All in float64, small models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowforge import registry
from flowforge.checkpoint import load_model, save_model
from flowforge.flows.vae import POSTERIORS, VAE
from flowforge.train.loop import Trainer, TrainerConfig
from flowforge.train.objectives import NegativeELBO

FLOW_POSTERIORS = [p for p in POSTERIORS if p != "gaussian"]


def _randomize(model: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every weight off its initial value (zero-initialised flow layers would be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _counts(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 17, (rows, features), generator=torch.Generator().manual_seed(seed)).double()


# ---------------------------------------------------------------- (a) linear-Gaussian model, exact log p(x)
D, LATENT, NOISE = 3, 2, 0.6


def _linear_gaussian() -> tuple[VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(z) = N(0, I), p(x | z) = N(Wz + b, s^2 I) with orthogonal columns of W (so the exact posterior is
    a diagonal Gaussian, linear in x) and the encoder set to that exact posterior."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    w = q[:, :LATENT] * torch.tensor([1.5, 0.7], dtype=torch.float64)
    b = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    vae = VAE(D, LATENT, hidden=(), posterior="gaussian", likelihood="gaussian").double()
    # Exact posterior: Sigma = (I + W^T W / s^2)^-1 (diagonal), mean = Sigma W^T (x - b) / s^2.
    sigma2 = 1 / (1 + (w * w).sum(0) / NOISE**2)
    gain = sigma2[:, None] * w.T / NOISE**2
    with torch.no_grad():
        encoder, decoder = vae.encoder[-1], vae.decoder[-1]
        encoder.weight.zero_()
        encoder.weight[:LATENT] = gain
        encoder.bias[:LATENT] = -gain @ b
        encoder.bias[LATENT:] = 0.5 * torch.log(sigma2)
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        vae.log_scale.fill_(math.log(NOISE))
    return vae, w, b, sigma2


def _exact_log_p(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    covariance = w @ w.T + NOISE**2 * torch.eye(D, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(b, covariance).log_prob(x)


def test_with_the_exact_posterior_every_importance_weight_is_log_p_x() -> None:
    vae, w, b, _ = _linear_gaussian()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = _exact_log_p(x, w, b)
    weights = vae.log_weights(x, 50)
    torch.testing.assert_close(weights, exact.expand(50, -1), rtol=0, atol=1e-10)
    torch.testing.assert_close(vae.elbo(x), exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(vae.iwae(x, 7), exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(vae.log_prob(x, k=3), exact, rtol=0, atol=1e-10)


def _off_posterior() -> tuple[VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear-Gaussian model with its encoder moved off the exact posterior, and data drawn from it."""
    vae, w, b, sigma2 = _linear_gaussian()
    with torch.no_grad():
        vae.encoder[-1].bias[:LATENT] += torch.tensor([0.4, -0.3], dtype=torch.float64)
        vae.encoder[-1].bias[LATENT:] += torch.tensor([0.35, -0.25], dtype=torch.float64)
    torch.manual_seed(3)
    x = vae.sample(300)
    return vae, x, _exact_log_p(x, w, b), sigma2


def test_the_elbo_gap_is_the_closed_form_kl_to_the_exact_posterior() -> None:
    vae, x, exact, sigma2 = _off_posterior()
    torch.manual_seed(4)
    elbo = vae.elbo(x, samples=400)
    # log p(x) - ELBO = KL(q || p(z | x)) for two diagonal Gaussians with the same covariance shift.
    mu_q, log_sigma_q, _ = vae.encode(x)
    mu_p, _, _ = _linear_gaussian()[0].encode(x)
    var_q, var_p = torch.exp(2 * log_sigma_q), sigma2
    kl = 0.5 * (var_q / var_p + (mu_q - mu_p).square() / var_p - 1 - torch.log(var_q / var_p)).sum(1)
    assert float(kl.mean().detach()) > 0.2
    torch.testing.assert_close((exact - elbo).mean(), kl.mean(), rtol=0, atol=0.01)


def test_iwae_climbs_from_the_elbo_to_log_p_x_as_k_grows() -> None:
    vae, x, exact, _ = _off_posterior()
    gaps = []
    for k in (1, 10, 100, 1000):
        torch.manual_seed(5)
        with torch.no_grad():
            gaps.append(float((exact - vae.iwae(x, k)).mean()))
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -0.005, gaps
    assert gaps[3] < 0.05 * gaps[0], gaps
    # For the same draws, the mean log-weight (ELBO) never exceeds their log-mean-exp (IWAE): Jensen.
    torch.manual_seed(6)
    weights = vae.log_weights(x, 64)
    assert bool((weights.mean(0) <= torch.logsumexp(weights, 0) - math.log(64) + 1e-12).all())


def test_iwae_does_not_depend_on_the_chunk_size() -> None:
    vae, x, _, _ = _off_posterior()
    torch.manual_seed(7)
    whole = vae.iwae(x[:5], 40, chunk=40)
    torch.manual_seed(7)
    eps = torch.randn(40, 5, LATENT, dtype=torch.float64)
    z, log_q = vae.posterior(x[:5], eps)
    direct = torch.logsumexp(vae.log_likelihood(x[:5], z) + vae.prior_log_prob(z) - log_q, 0) - math.log(40)
    torch.testing.assert_close(whole, direct, rtol=0, atol=1e-12)
    torch.manual_seed(7)
    torch.testing.assert_close(vae.iwae(x[:5], 40, chunk=3), whole, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- (b) the flow posterior's density
def _flow_vae(posterior: str, **options) -> VAE:
    """A small VAE; the flow settings given only to the parts that read them (a VAE refuses the rest)."""
    torch.manual_seed(0)
    if posterior != "gaussian":
        options = {"transforms": 3, "flow_hidden": (8,), "encoder_context": 4, **options}
    if options.get("prior", "gaussian") == "gaussian":
        options = {k: v for k, v in options.items() if k not in ("prior_transforms", "prior_hidden")}
    if posterior != "spline" and options.get("prior") != "nsf":
        options = {k: v for k, v in options.items() if k not in ("bins", "bound")}
    vae = VAE(5, 3, posterior=posterior, hidden=(8,), **options).double()
    _randomize(vae)
    return vae


@pytest.mark.parametrize("posterior", FLOW_POSTERIORS)
def test_flow_posterior_log_q_is_the_change_of_variables_of_its_jacobian(posterior: str) -> None:
    vae = _flow_vae(posterior, bound=1.5)
    x = _counts(1, 5)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        eps = 1.5 * torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
        _, log_q = vae.posterior(x, eps)
        jacobian = torch.autograd.functional.jacobian(
            lambda e: vae.posterior(x, e.view(1, 1, 3))[0].view(3), eps.view(3)
        )
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum() - torch.linalg.slogdet(jacobian)[1]
        assert abs(float(torch.linalg.slogdet(jacobian)[1])) > 1e-3  # the flow is not volume preserving here
        torch.testing.assert_close(log_q.view(()), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_flow_posterior_density_is_normalised(posterior: str) -> None:
    """E_{z~q}[r(z) / q(z)] = 1 for any normalised density r: a Monte-Carlo check of log q's constant and sign."""
    vae = _flow_vae(posterior)
    x = _counts(1, 5, seed=3)
    torch.manual_seed(8)
    with torch.no_grad():
        z, log_q = vae.sample_posterior(x, 40_000)
    z, log_q = z[:, 0], log_q[:, 0]
    r = torch.distributions.Normal(z.mean(0), 0.5 * z.std(0)).log_prob(z).sum(1)
    assert abs(float(torch.exp(r - log_q).mean()) - 1) < 0.05


# ---------------------------------------------------------------- decoders
@pytest.mark.parametrize("likelihood", ["categorical", "logistic"])
def test_discrete_decoders_are_normalised_over_the_17_levels(likelihood: str) -> None:
    torch.manual_seed(0)
    vae = VAE(1, 2, hidden=(8,), likelihood=likelihood).double()
    _randomize(vae, scale=1.0)
    levels = torch.arange(17, dtype=torch.float64)[:, None]  # every value of the one feature
    for z in torch.randn(4, 2, dtype=torch.float64) * 2:
        log_p = vae.log_likelihood(levels, z.expand(1, 17, 2))[0]
        torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["categorical", "logistic", "gaussian"])
def test_samples_have_the_data_shape_and_values(likelihood: str) -> None:
    torch.manual_seed(0)
    vae = VAE(64, 3, hidden=(8,), likelihood=likelihood, prior="maf", prior_transforms=1, prior_hidden=(8,))
    samples = vae.sample(10)
    assert samples.shape == (10, 64) and samples.dtype == torch.float32
    if likelihood != "gaussian":
        assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16
        vae.elbo(samples)  # the model accepts its own samples


# ---------------------------------------------------------------- (c) gradients
@pytest.mark.parametrize(
    "options",
    [{"posterior": p} for p in POSTERIORS]
    + [{"posterior": "iaf", "prior": p} for p in ("maf", "realnvp", "nsf")]
    + [{"posterior": "iaf", "likelihood": lik} for lik in ("logistic", "gaussian")],
    ids=lambda o: "-".join(o.values()),
)
def test_the_elbo_gradient_reaches_every_parameter(options: dict) -> None:
    vae = _flow_vae(prior_transforms=2, prior_hidden=(8,), **options)
    x = _counts(6, 5) / (16 if options.get("likelihood") == "gaussian" else 1)
    (-vae.elbo(x).mean()).backward()
    missing = [name for name, p in vae.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []


# ---------------------------------------------------------------- (d) rebuild, objective, trainer
def _non_default() -> VAE:
    return VAE(
        5,
        3,
        (8, 6),
        posterior="spline",
        transforms=2,
        flow_hidden=(8,),
        encoder_context=4,
        bins=5,
        bound=2.0,
        prior="nsf",
        prior_transforms=2,
        prior_hidden=(8,),
        likelihood="logistic",
        levels=9,
        activation=nn.Tanh,
        decoder_dropout=0.25,
    )


def test_a_saved_vae_rebuilds_with_every_argument_and_gives_the_same_elbo(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = _non_default().double()
    _randomize(vae)
    config = registry.to_config(vae)
    assert config["__object__"] == "vae" and config["arguments"]["activation"] == {"__class__": "tanh"}
    assert config["arguments"]["decoder_dropout"] == 0.25
    save_model(tmp_path / "vae", vae)
    loaded = load_model(tmp_path / "vae")
    assert isinstance(loaded, VAE) and registry.to_config(loaded) == config
    x = torch.randint(0, 9, (4, 5)).double()
    outputs = []
    for model in (vae, loaded):
        torch.manual_seed(11)
        outputs.append((model.elbo(x), model.iwae(x, 20), model.sample(3)))
    for before, after in zip(*outputs, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_decoder_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    vae = VAE(5, 3, (8, 6), decoder_dropout=0.5)
    z = torch.randn(64, 3)

    def without_dropout(h: torch.Tensor) -> torch.Tensor:
        for layer in vae.decoder:
            h = h if isinstance(layer, nn.Dropout) else layer(h)
        return h

    assert sum(isinstance(layer, nn.Dropout) for layer in vae.decoder) == 2  # one per hidden layer
    vae.eval()
    torch.testing.assert_close(vae.decoder(z), without_dropout(z), rtol=0, atol=0)
    x = _counts(4, 5)
    torch.manual_seed(1)
    first = vae.elbo(x)
    torch.manual_seed(1)
    torch.testing.assert_close(vae.elbo(x), first, rtol=0, atol=0)
    vae.train()
    linear, relu, dropout = list(vae.decoder)[:3]
    before = relu(linear(z))
    after = dropout(before)
    active = before > 0
    dropped = (after == 0) & active
    assert 0.3 < float(dropped.sum() / active.sum()) < 0.7  # about half the active units
    kept = active & ~dropped
    torch.testing.assert_close(after[kept], 2 * before[kept])  # scaled by 1 / (1 - p)


def test_negative_elbo_is_minus_the_mean_elbo_and_trains_a_vae(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VAE(64, 2, hidden=(16,), posterior="iaf", transforms=1, flow_hidden=(8,), encoder_context=4)
    data = _counts(64, 64).float()
    objective = NegativeELBO()
    torch.manual_seed(1)
    loss = objective.loss(vae, (data, None))
    torch.manual_seed(1)
    torch.testing.assert_close(loss, -vae.elbo(data).mean())
    torch.manual_seed(1)
    assert objective.validation(vae, (data, None)) == pytest.approx(float(loss.detach()))
    config = TrainerConfig(steps=40, batch_size=32, lr=3e-3, eval_every=20, progress=False, log_every=1)
    state = Trainer(vae, objective, config, data=data, validation_data=data, directory=tmp_path / "run").fit()
    losses = [row["loss"] for row in state.history if "loss" in row]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert isinstance(load_model(tmp_path / "run"), VAE)
    with pytest.raises(ValueError, match="samples must be a positive int, got 0"):
        NegativeELBO(samples=0)


def test_kl_weight_scales_the_latent_term_linearly() -> None:
    torch.manual_seed(0)
    vae = VAE(64, 3, hidden=(16,), posterior="iaf", transforms=2, flow_hidden=(8,), encoder_context=4).double()
    _randomize(vae)
    data = _counts(8, 64)

    def elbo(**kwargs) -> torch.Tensor:
        torch.manual_seed(5)  # the same posterior draws for every weight
        return vae.elbo(data, samples=3, **kwargs)

    reconstruction, full, half = elbo(kl_weight=0.0), elbo(kl_weight=1.0), elbo(kl_weight=0.5)
    torch.testing.assert_close(full, elbo())
    torch.testing.assert_close(half, (reconstruction + full) / 2)
    torch.testing.assert_close(elbo(kl_weight=3.0), 3 * full - 2 * reconstruction)
    torch.manual_seed(5)
    terms = vae._weight_terms(data, 3)
    torch.testing.assert_close(reconstruction, terms[0].mean(0))
    with pytest.raises(ValueError, match="kl_weight"):
        vae.elbo(data, kl_weight=-0.5)


def test_kl_warmup_raises_the_weight_linearly_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VAE(64, 2, hidden=(16,), posterior="iaf", transforms=1, flow_hidden=(8,), encoder_context=4).double()
    _randomize(vae)
    data = _counts(16, 64)
    objective = NegativeELBO(kl_warmup_steps=4)
    for step in range(6):
        torch.manual_seed(step)
        loss = objective.loss(vae, (data, None))
        torch.manual_seed(step)
        torch.testing.assert_close(loss, -vae.elbo(data, kl_weight=min(1.0, step / 4)).mean())
    torch.manual_seed(9)
    checked = objective.validation(vae, (data, None))  # the bound itself, and no step counted
    torch.manual_seed(9)
    assert checked == pytest.approx(float(-vae.elbo(data).mean().detach())) and objective.steps_taken == 6
    # The counter is the objective's state: a resumed run continues the schedule.
    config = TrainerConfig(steps=3, batch_size=8, lr=1e-3, progress=False, checkpoint_every=3)
    first = NegativeELBO(kl_warmup_steps=10)
    Trainer(vae, first, config, data=data, directory=tmp_path / "run").fit()
    assert first.steps_taken == 3
    resumed = NegativeELBO(kl_warmup_steps=10)
    Trainer(vae, resumed, config, data=data, directory=tmp_path / "run").load()
    assert resumed.steps_taken == 3 and resumed.kl_weight() == pytest.approx(0.3)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="kl_warmup_steps must be an int >= 0"):
            NegativeELBO(kl_warmup_steps=bad)


# ---------------------------------------------------------------- (e) bad inputs
def test_bad_data_is_refused_naming_the_argument_and_what_is_allowed() -> None:
    torch.manual_seed(0)
    vae = VAE(64, 2, hidden=(8,))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 64\), got \(3, 1, 8, 8\) \(flatten images"):
        vae.elbo(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 64\), got \(3, 63\)"):
        vae.elbo(torch.zeros(3, 63))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        vae.elbo([[0.0] * 64])
    for value, shown in ((17.0, "17.0"), (2.5, "2.5"), (-1.0, "-1.0"), (float("nan"), "nan")):
        x = torch.zeros(3, 64)
        x[1, 5] = value
        with pytest.raises(ValueError, match=rf"whole numbers in 0\.\.16 .* got {shown} at batch index 1, feature 5"):
            vae.iwae(x, 2)
    with pytest.raises(TypeError, match=r"dtype torch\.bool"):
        vae.elbo(torch.zeros(3, 64, dtype=torch.bool))
    assert vae.elbo(torch.zeros(3, 64, dtype=torch.long)).shape == (3,)  # integer counts are data here
    assert vae.elbo(torch.zeros(0, 64)).shape == (0,) and vae.iwae(torch.zeros(0, 64), 5).shape == (0,)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"k must be a positive int, got {k!r}"):
            vae.iwae(torch.zeros(3, 64), k)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        vae.elbo(torch.zeros(3, 64), samples=0)
    with pytest.raises(ValueError, match="context must be None"):
        vae.log_prob(torch.zeros(3, 64), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"eps must have shape \(n, 3, 2\)"):
        vae.posterior(torch.zeros(3, 64), torch.zeros(3, 2))
    gaussian = VAE(4, 2, hidden=(8,), likelihood="gaussian")
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        gaussian.elbo(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        gaussian.elbo(torch.full((3, 4), float("inf")))


def test_bad_constructor_arguments_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown posterior 'planar'; choose one of 'gaussian', 'iaf'"):
        VAE(posterior="planar")
    with pytest.raises(ValueError, match="unknown prior 'vamp'"):
        VAE(prior="vamp")
    with pytest.raises(ValueError, match="unknown likelihood 'bernoulli'"):
        VAE(likelihood="bernoulli")
    with pytest.raises(ValueError, match="posterior 'coupling' needs latent >= 2"):
        VAE(latent=1, posterior="coupling")
    with pytest.raises(ValueError, match="levels must be an int >= 2, got 1"):
        VAE(levels=1)
    with pytest.raises(ValueError, match=r"hidden must be a sequence of positive ints .* got \(0,\)"):
        VAE(hidden=(0,))
    with pytest.raises(ValueError, match="latent must be a positive int, got 0"):
        VAE(latent=0)
    with pytest.raises(TypeError, match=r"activation must be a torch\.nn\.Module class"):
        VAE(activation="relu")
    with pytest.raises(ValueError, match="bins must be a positive int, got 'x'"):
        VAE(bins="x")  # refused although no spline reads it: it is saved with the model
    with pytest.raises(ValueError, match=r"decoder_dropout must be a probability in \[0, 1\), got 1"):
        VAE(decoder_dropout=1)
    with pytest.raises(ValueError, match=r"decoder_dropout = 0\.2: the decoder has no hidden layers"):
        VAE(hidden=(), decoder_dropout=0.2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transforms": 8}, r"transforms = 8: posterior = 'gaussian' does not read it \(a flow posterior does\)"),
        ({"encoder_context": 0}, "encoder_context = 0: posterior = 'gaussian' does not read it"),
        ({"posterior": "iaf", "prior_hidden": (8,)}, r"prior_hidden = \(8,\): prior = 'gaussian' does not read it"),
        ({"posterior": "iaf", "bins": 5}, "bins = 5: posterior = 'iaf' and prior = 'gaussian' do not read it"),
        ({"likelihood": "gaussian", "levels": 9}, "levels = 9: likelihood = 'gaussian' does not read it"),
    ],
)
def test_settings_the_model_would_not_read_are_refused_and_saved_ones_still_rebuild(
    options: dict, message: str, tmp_path: Path
) -> None:
    from tests.invariants import edit_checkpoint

    with pytest.raises(ValueError, match=message):
        VAE(5, 2, (8,), **options)
    read = {k: v for k, v in options.items() if k in ("posterior", "likelihood")}
    vae = VAE(5, 2, (8,), **read)
    save_model(tmp_path, vae)

    def as_an_earlier_release_saved_it(manifest: dict) -> None:  # before the VAE refused such settings
        manifest["model"]["arguments"].update({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})

    edit_checkpoint(tmp_path, as_an_earlier_release_saved_it)
    loaded = load_model(tmp_path)
    assert registry.to_config(loaded)["arguments"] == {
        **registry.to_config(vae)["arguments"],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }
    with pytest.raises(ValueError, match=r"prior_transforms must be an int in 1\.\.1000"):
        VAE(prior_transforms=10**9)
