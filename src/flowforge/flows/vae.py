r"""Variational autoencoders with normalizing-flow posteriors and an optional flow prior.

A VAE models data :math:`x` through a latent :math:`z`: a prior :math:`p(z)` and a decoder
:math:`p_\theta(x \mid z)`. The marginal :math:`\log p(x) = \log \int p_\theta(x \mid z)\,p(z)\,dz`
is intractable; an encoder :math:`q_\phi(z \mid x)` gives the *evidence lower bound*

.. math::
    \log p(x) \;\ge\; \mathrm{ELBO}(x) = \mathbb E_{z \sim q(z \mid x)}
        \big[\log p_\theta(x \mid z) + \log p(z) - \log q_\phi(z \mid x)\big],

with equality exactly when :math:`q(z \mid x)` is the true posterior :math:`p(z \mid x)`.

**Flow posterior** (Rezende & Mohamed 2015; Kingma et al. 2016). The encoder gives a diagonal
Gaussian :math:`q_0(z_0 \mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma(x)^2)` and a feature
vector :math:`h(x)`; :math:`K` invertible layers :math:`f_1, \dots, f_K`, each conditioned on
:math:`h(x)`, refine the draw, :math:`z_K = f_K \circ \dots \circ f_1(z_0)`. By the change of
variables,

.. math::
    \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
        - \sum_{k=1}^{K} \log\Big|\det \frac{\partial f_k}{\partial z_{k-1}}\Big|.

The layers are flowforge transforms used in their generative (``inverse``) direction, whose
``logabsdet`` is exactly the sum above (:mod:`flowforge.transforms.base`):

* ``"gaussian"``: no layer (:math:`K = 0`), the plain VAE of Kingma & Welling (2014);
* ``"iaf"``: inverse autoregressive affine layers (``Invert(MaskedAutoregressive)``), one MADE
  pass each to sample, orders alternating natural / reversed;
* ``"maf"``: masked autoregressive affine layers sampled in their sequential direction (same
  family as IAF, ``latent`` small steps per layer; for comparison);
* ``"coupling"``: RealNVP affine couplings with alternating masks (``latent >= 2``);
* ``"spline"``: inverse autoregressive rational-quadratic splines (``bins``, ``bound``).

Every conditioner sees :math:`h(x)` as its context, and starts at zero, so a fresh flow
posterior is :math:`q_0` (for ``"coupling"`` over more than two latent coordinates, up to the fixed
shuffles of coordinates placed between pairs of couplings).

**Prior**: :math:`\mathcal N(0, I)` (``"gaussian"``) or a flowforge flow over the latent,
``"maf"``, ``"realnvp"`` or ``"nsf"`` (the recipes of :mod:`flowforge.flows.recipes`, each of
which evaluates :math:`\log p(z)` of arbitrary points in one pass).

**Decoder** :math:`p_\theta(x \mid z)`, factorised over the ``features`` entries of :math:`x`
(an MLP of :math:`z` with the encoder's hidden widths reversed), chosen by ``likelihood``:

* ``"categorical"`` (default): each entry is one of ``levels`` values :math:`0, \dots, L-1`
  (the 8x8 digits: 17 levels, pixel counts 0..16) with its own softmax over the :math:`L`
  values, :math:`\log p(x \mid z) = \sum_j \log \mathrm{softmax}(\ell_j(z))_{x_j}`.
* ``"logistic"``: discretised logistic over the same values (Salimans et al. 2017): with mean
  :math:`m_j(z)` and scale :math:`s_j(z)` in pixel units,
  :math:`P(x_j = k) = \sigma\big(\tfrac{k + 1/2 - m_j}{s_j}\big) - \sigma\big(\tfrac{k - 1/2 - m_j}{s_j}\big)`,
  the first and last values taking the tails (:math:`\pm\infty` for the outer edge).
* ``"gaussian"``: real-valued data, :math:`\mathcal N(x; g(z), \mathrm{diag}\,s^2)` with a learned
  per-feature :math:`s` that does not depend on :math:`z`. With ``hidden=()`` it is the
  linear-Gaussian model :math:`p(x) = \mathcal N(b, WW^\top + s^2 I)` whose :math:`\log p(x)`
  is known in closed form (the test suite checks the bounds against it).

The encoder sees counts as :math:`x / (L-1) - 1/2` and real data as they are.

**Importance-weighted bound** (Burda et al. 2016). With :math:`k` draws :math:`z_i \sim q(z \mid x)`
and log-weights :math:`w_i = \log p(x, z_i) - \log q(z_i \mid x)`,

.. math::
    \mathcal L_k(x) = \log \frac1k \sum_{i=1}^k e^{w_i}
        = \operatorname{logsumexp}_i w_i - \log k,
    \qquad \mathrm{ELBO} = \mathcal L_1 \le \mathcal L_k \le \mathcal L_{k+1} \le \log p(x)

in expectation, and :math:`\mathcal L_k \to \log p(x)` as :math:`k \to \infty`. :meth:`VAE.iwae`
draws the :math:`k` samples in chunks (at most ``CHUNK_ROWS`` latent rows per pass), so
:math:`k = 1000` fits in memory; :meth:`VAE.log_prob` is :math:`\mathcal L_k` with
``k = DEFAULT_IWAE_SAMPLES`` (1000) by default. All estimates are per row, in nats.

**Inputs.** ``x`` has shape ``(batch, features)`` (flatten images: ``pixels.flatten(1)``). For the
categorical and logistic decoders it holds whole numbers in ``0..levels-1``, as an integer or a
floating-point tensor; for the Gaussian decoder it is a floating-point tensor of finite values
(integer tensors are refused, :mod:`flowforge.validation`). Both are cast to the model's dtype.

References:
    Kingma, Welling. Auto-Encoding Variational Bayes. ICLR 2014.
    Rezende, Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
    Burda, Grosse, Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling. Improved Variational Inference with
    Inverse Autoregressive Flow. NeurIPS 2016.

Example (train it with :class:`~flowforge.train.objectives.NegativeELBO` and the :class:`~flowforge.train.Trainer`):

>>> import torch
>>> vae = VAE(64, latent=4, hidden=(32,), posterior="iaf", transforms=2, flow_hidden=(16,))
>>> pixels = torch.randint(0, 17, (5, 64))
>>> vae.elbo(pixels).shape, vae.iwae(pixels, k=50).shape, vae.sample(3).shape
(torch.Size([5]), torch.Size([5]), torch.Size([3, 64]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.flows.base import Flow
from flowforge.flows.recipes import MAF, NSF, RealNVP
from flowforge.nn import MLP
from flowforge.registry import Rebuildable, refuse_unread, register
from flowforge.transforms import (
    AffineCoupling,
    AffineElementwise,
    Compose,
    Invert,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
    Transform,
)
from flowforge.transforms.elementwise import soft_clamp
from flowforge.validation import (
    MAX_LAYERS,
    all_finite,
    check_activation,
    check_batched,
    check_choice,
    check_count,
    check_dropout,
    check_floating,
    check_real,
    check_sample_count,
    check_widths,
    describe_shape,
    finite_checks_enabled,
)

POSTERIORS = ("gaussian", "iaf", "maf", "coupling", "spline")
PRIORS = ("gaussian", "maf", "realnvp", "nsf")
LIKELIHOODS = ("categorical", "logistic", "gaussian")
#: ``k`` of :meth:`VAE.log_prob` when none is given.
DEFAULT_IWAE_SAMPLES = 1000
#: At most this many latent rows (samples x batch) go through the flows and the decoder at once.
CHUNK_ROWS = 8192
#: Soft clamp on the discretised logistic's log-scale (pixel units): s in (e^-4, e^4).
_LOGISTIC_LOG_SCALE_BOUND = 4.0
_LOG_2PI = math.log(2 * math.pi)


def _check_latents(z: object, latent: int) -> None:
    """Latent codes given by a caller: a floating-point tensor ``(..., latent)`` of finite numbers."""
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[-1] != latent:
        raise ValueError(f"z must have shape (..., {latent}), got {tuple(getattr(z, 'shape', ())) or type(z).__name__}")
    check_floating("z", z)
    if finite_checks_enabled() and not all_finite(z):
        raise ValueError("z must be finite (NaN or inf found)")


def _refuse_unread(given: dict[str, object], posterior: str, prior: str, likelihood: str) -> None:
    """Refuse an argument the chosen posterior, prior and decoder never read, given a value other
    than its default (flow layers for a Gaussian posterior, spline bins for an affine one)."""
    readers = {
        ("transforms", "flow_hidden", "encoder_context"): (
            posterior != "gaussian",
            f"posterior = {posterior!r} does not read it (a flow posterior does)",
        ),
        ("prior_transforms", "prior_hidden"): (
            prior != "gaussian",
            f"prior = {prior!r} does not read it (a flow prior does)",
        ),
        ("bins", "bound"): (
            posterior == "spline" or prior == "nsf",
            f"posterior = {posterior!r} and prior = {prior!r} do not read it (posterior 'spline' and prior 'nsf' do)",
        ),
        ("levels",): (
            likelihood != "gaussian",
            f"likelihood = {likelihood!r} does not read it (the discrete likelihoods do)",
        ),
    }
    for names, (read, why) in readers.items():
        if not read:
            refuse_unread(VAE, {name: given[name] for name in names}, why)


@register("vae")
class VAE(Rebuildable, nn.Module):
    r"""A variational autoencoder with a (flow) posterior, an optional flow prior and a discrete decoder.

    See the module docstring for the maths. ``elbo``, ``iwae`` and ``log_prob`` return one
    number per row, shape ``(batch,)``, in nats; all are differentiable (reparametrised draws).

    Arguments:
        features: size :math:`D` of a data row (64 for the 8x8 digits).
        latent: size of :math:`z`.
        hidden: hidden widths of the encoder MLP; the decoder uses them reversed (``()``: linear).
            The defaults (latent 16, widths 128) suit the 1,438 training digits; widths of 256
            overfit them (``benchmarks/vae_digits.py``).
        posterior: ``"gaussian"``, ``"iaf"``, ``"maf"``, ``"coupling"`` or ``"spline"``.
        transforms: number :math:`K` of flow layers of a flow posterior (unused by ``"gaussian"``).
        flow_hidden: hidden widths of every posterior-layer conditioner (MADE or MLP).
        encoder_context: size of the encoder's feature vector :math:`h(x)`, the context of every
            posterior layer (0: layers that see only :math:`z`; unused by ``"gaussian"``).
        bins, bound: the ``"spline"`` posterior's (and the ``"nsf"`` prior's) spline bins and
            half-width of the interval outside which it is the identity.
        prior: ``"gaussian"`` (:math:`\mathcal N(0, I)`), ``"maf"``, ``"realnvp"`` or ``"nsf"``.
        prior_transforms, prior_hidden: layers and conditioner widths of a flow prior.
        likelihood: the decoder, ``"categorical"``, ``"logistic"`` or ``"gaussian"``.
        levels: the number of values :math:`L` of each entry for the discrete decoders (17 for the
            digits' pixel counts 0..16).
        activation: activation class of every network (a registered one: ``flowforge list``).
        decoder_dropout: dropout probability after each of the decoder's hidden activations, in
            training mode only (``model.eval()`` turns it off for the bounds). It regularises a
            decoder that overfits a small training set (the 1,438 digits: ``benchmarks/vae_digits.py``).

    Rebuild: a registered model (``"vae"``): every argument above is recorded, so
    :func:`flowforge.checkpoint.save_model` / :func:`~flowforge.checkpoint.load_model` (and
    ``to_config`` / ``from_config``) give the same model.
    """

    def __init__(
        self,
        features: int = 64,
        latent: int = 16,
        hidden: Sequence[int] = (128, 128),
        posterior: str = "gaussian",
        transforms: int = 4,
        flow_hidden: Sequence[int] = (128, 128),
        encoder_context: int = 32,
        *,
        bins: int = 8,
        bound: float = 3.0,
        prior: str = "gaussian",
        prior_transforms: int = 4,
        prior_hidden: Sequence[int] = (128, 128),
        likelihood: str = "categorical",
        levels: int = 17,
        activation: type[nn.Module] = nn.ReLU,
        decoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = check_count("features", features, low=1)
        self.latent = check_count("latent", latent, low=1)
        hidden = check_widths("hidden", hidden)
        flow_hidden = check_widths("flow_hidden", flow_hidden)
        prior_hidden = check_widths("prior_hidden", prior_hidden)
        self.posterior_kind = check_choice("posterior", posterior, POSTERIORS)
        self.prior_kind = check_choice("prior", prior, PRIORS)
        self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
        check_count("transforms", transforms, high=MAX_LAYERS)
        check_count("prior_transforms", prior_transforms, high=MAX_LAYERS)
        check_count("encoder_context", encoder_context, low=0)
        check_count("bins", bins)  # checked whether or not a spline reads them: they are saved with the model
        check_real("bound", bound, positive=True)
        self.levels = check_count("levels", levels, low=2)
        check_activation("activation", activation)
        decoder_dropout = check_dropout("decoder_dropout", decoder_dropout)
        if decoder_dropout and not hidden:
            raise ValueError(f"decoder_dropout = {decoder_dropout}: the decoder has no hidden layers (hidden = ())")
        given = dict(
            transforms=transforms,
            flow_hidden=flow_hidden,
            encoder_context=encoder_context,
            bins=bins,
            bound=bound,
            prior_transforms=prior_transforms,
            prior_hidden=prior_hidden,
            levels=levels,
        )
        _refuse_unread(given, posterior, prior, likelihood)  # not when a saved VAE rebuilds
        if posterior == "coupling" and latent < 2:
            raise ValueError(f"posterior 'coupling' needs latent >= 2 (a coupling splits z in two), got {latent}")
        if prior == "realnvp" and latent < 2:
            raise ValueError(f"prior 'realnvp' needs latent >= 2 (a coupling splits z in two), got {latent}")

        #: the shape of one data row, and no external context (``log_prob(x, context=None)``).
        self.event_shape = torch.Size([self.features])
        self.context_features = 0
        self.discrete = self.likelihood != "gaussian"
        self.context_size = 0 if posterior == "gaussian" else encoder_context
        self.encoder = MLP(features, 2 * latent + self.context_size, hidden, activation)
        per_feature = {"categorical": levels, "logistic": 2, "gaussian": 1}[self.likelihood]
        self.decoder = MLP(latent, features * per_feature, tuple(reversed(hidden)), activation, dropout=decoder_dropout)
        if self.likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(features))
        self.posterior_flow: Transform | None = (
            None
            if posterior == "gaussian"
            else self._posterior_layers(posterior, transforms, flow_hidden, self.context_size, bins, bound, activation)
        )
        self.prior: Flow | None = None
        if prior == "maf":
            self.prior = MAF(latent, 0, prior_transforms, prior_hidden, activation=activation)
        elif prior == "realnvp":
            self.prior = RealNVP(latent, 0, prior_transforms, prior_hidden, activation=activation)
        elif prior == "nsf":
            self.prior = NSF(latent, 0, prior_transforms, prior_hidden, bins, bound, activation=activation)

    def _posterior_layers(
        self,
        kind: str,
        transforms: int,
        hidden: tuple[int, ...],
        context: int,
        bins: int,
        bound: float,
        activation: type[nn.Module],
    ) -> Compose:
        """The K layers, each used in its ``inverse`` (generative) direction: z_0 -> z_K."""
        natural = torch.arange(self.latent)
        layers: list[Transform] = []
        for i in range(transforms):
            order = natural.flip(0) if i % 2 else natural
            if kind == "coupling":
                layers.append(AffineCoupling(natural % 2 == i % 2, context, hidden, activation))
                if self.latent > 2 and i % 2 == 1 and i < transforms - 1:
                    # alternating masks only pair even with odd features: shuffle between pairs (fixed seed)
                    layers.append(Permutation.random(self.latent, seed=i))
                continue
            transformer = RationalQuadraticSpline(bins, bound) if kind == "spline" else AffineElementwise()
            layer = MaskedAutoregressive(self.latent, transformer, context, hidden, activation=activation, order=order)
            # IAF and the spline posterior sample through the MADE's one-pass (forward) direction.
            layers.append(layer if kind == "maf" else Invert(layer))
        return Compose(layers)

    # ---------------------------------------------------------------- inputs
    def _dtype(self) -> torch.dtype:
        return self.decoder[-1].weight.dtype

    def check_data(self, x: object) -> Tensor:
        """``x`` checked (shape, dtype, values; see the module docstring) and cast to the model's dtype."""
        expected = describe_shape(("batch", self.features))
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.features:
            hint = ""
            if x.dim() > 2 and math.prod(x.shape[1:]) == self.features:
                hint = " (flatten images first: x.flatten(1))"
            raise ValueError(f"x must have shape {expected}, got {describe_shape(tuple(x.shape))}{hint}")
        if not self.discrete:
            return check_batched("x", x, (self.features,), finite=True, dtype=self._dtype())
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(
                f"x must hold counts 0..{self.levels - 1} as an integer or floating-point tensor, got dtype {x.dtype}"
            )
        x = x.to(self._dtype())
        bad = ~((x >= 0) & (x <= self.levels - 1) & (x == x.round()))  # NaN fails every comparison
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"x must hold whole numbers in 0..{self.levels - 1} (the {self.likelihood} decoder's "
                f"{self.levels} levels), got {float(x[row, column])!r} at batch index {row}, feature {column}"
            )
        return x

    @staticmethod
    def _check_context(context: object) -> None:
        if context is not None:
            raise ValueError("a VAE is unconditional: context must be None")

    # ---------------------------------------------------------------- encoder and posterior
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""The encoder's :math:`\mu(x)`, :math:`\log\sigma(x)` (batch, latent) and :math:`h(x)` (batch, c) or None."""
        x = self.check_data(x)
        inputs = x / (self.levels - 1) - 0.5 if self.discrete else x
        out = self.encoder(inputs)
        mu, log_sigma = out[:, : self.latent], out[:, self.latent : 2 * self.latent]
        h = out[:, 2 * self.latent :] if self.context_size else None
        return mu, log_sigma, h

    def _push(self, eps: Tensor, mu: Tensor, log_sigma: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        n, batch = eps.shape[:2]
        z0 = mu + torch.exp(log_sigma) * eps
        log_q = (-0.5 * eps.square() - log_sigma - 0.5 * _LOG_2PI).sum(-1)
        if self.posterior_flow is None:
            return z0, log_q
        context = None if h is None else h.repeat(n, 1)  # row i * batch + b belongs to data row b
        z, logabsdet = self.posterior_flow.inverse(z0.reshape(n * batch, self.latent), context)
        return z.reshape(n, batch, self.latent), log_q - logabsdet.reshape(n, batch)

    def posterior(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        r"""Push standard-normal noise through :math:`q(z \mid x)`.

        :math:`z_0 = \mu(x) + \sigma(x) \odot \varepsilon`, then the K layers. ``eps``:
        ``(n, batch, latent)``; returns :math:`z_K` of that shape and, shape ``(n, batch)``,

        .. math:: \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
            - \sum_k \log|\det \partial f_k / \partial z_{k-1}|.
        """
        mu, log_sigma, h = self.encode(x)
        if not isinstance(eps, Tensor) or eps.dim() != 3 or tuple(eps.shape[1:]) != tuple(mu.shape):
            raise ValueError(
                f"eps must have shape (n, {mu.shape[0]}, {self.latent}) for x of batch {mu.shape[0]}, "
                f"got {tuple(getattr(eps, 'shape', ()))}"
            )
        check_batched("eps", eps, tuple(mu.shape), finite=True)  # floating point, no NaN or inf
        return self._push(eps.to(mu.dtype), mu, log_sigma, h)

    def sample_posterior(self, x: Tensor, n: int = 1) -> tuple[Tensor, Tensor]:
        r"""``n`` reparametrised draws :math:`z \sim q(z \mid x)` per row, ``(n, batch, latent)``, and
        their log-densities ``(n, batch)``."""
        n = check_sample_count(n)
        mu, log_sigma, h = self.encode(x)
        return self._push(torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device), mu, log_sigma, h)

    # ---------------------------------------------------------------- prior and decoder
    def prior_log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log p(z)` for ``z`` of shape ``(..., latent)``; returns shape ``(...)``."""
        _check_latents(z, self.latent)
        return self._prior_log_prob(z)

    def _prior_log_prob(self, z: Tensor) -> Tensor:
        if self.prior is None:
            return (-0.5 * z.square() - 0.5 * _LOG_2PI).sum(-1)
        return self.prior.log_prob(z.reshape(-1, self.latent)).reshape(z.shape[:-1])

    def _decoder_output(self, z: Tensor) -> Tensor:
        """The decoder's raw output for ``z`` (..., latent): (..., features, outputs per feature)."""
        return self.decoder(z.reshape(-1, self.latent)).reshape(*z.shape[:-1], self.features, -1)

    def _logistic(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The discretised logistic's mean (pixel units) and log-scale."""
        mean = (self.levels - 1) * (out[..., 0] + 0.5)
        return mean, soft_clamp(out[..., 1], _LOGISTIC_LOG_SCALE_BOUND)

    def _log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        out = self._decoder_output(z)  # (n, batch, features, p)
        if self.likelihood == "categorical":
            index = x.long().unsqueeze(-1).expand(*out.shape[:-1], 1)
            log_p = out.gather(-1, index).squeeze(-1) - torch.logsumexp(out, -1)
        elif self.likelihood == "logistic":
            mean, log_s = self._logistic(out)
            inverse_scale = torch.exp(-log_s)
            upper = (x + 0.5 - mean) * inverse_scale
            lower = (x - 0.5 - mean) * inverse_scale
            # log(sigmoid(a) - sigmoid(b)) = a + log(1 - e^(b - a)) - softplus(a) - softplus(b), a > b.
            inner = upper + torch.log(-torch.expm1(-inverse_scale)) - F.softplus(upper) - F.softplus(lower)
            log_p = torch.where(
                x <= 0, -F.softplus(-upper), torch.where(x >= self.levels - 1, -F.softplus(lower), inner)
            )
        else:
            standard = (x - out[..., 0]) * torch.exp(-self.log_scale)
            log_p = -0.5 * standard.square() - self.log_scale - 0.5 * _LOG_2PI
        return log_p.sum(-1)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        r""":math:`\log p_\theta(x \mid z)` for ``x`` (batch, features) and ``z`` (..., batch, latent);
        shape (..., batch)."""
        x = self.check_data(x)
        if not isinstance(z, Tensor) or z.dim() < 2 or tuple(z.shape[-2:]) != (x.shape[0], self.latent):
            raise ValueError(
                f"z must have shape (..., {x.shape[0]}, {self.latent}) for x of batch {x.shape[0]}, "
                f"got {tuple(getattr(z, 'shape', ()))}"
            )
        _check_latents(z, self.latent)
        return self._log_likelihood(x, z.to(self._dtype()))

    # ---------------------------------------------------------------- bounds
    def log_weights(self, x: Tensor, k: int, chunk: int | None = None) -> Tensor:
        r"""Importance log-weights :math:`w_i = \log p(x, z_i) - \log q(z_i \mid x)` of ``k`` draws
        :math:`z_i \sim q(z \mid x)` per row, shape ``(k, batch)``.

        The noise is drawn at once; the draws go through the posterior, prior and decoder ``chunk``
        at a time (default: as many as keep ``chunk * batch <= CHUNK_ROWS``), so the result for a
        seed does not depend on ``chunk``; the encoder runs once.
        """
        reconstruction, latent = self._weight_terms(x, k, chunk)
        return reconstruction + latent

    def _weight_terms(self, x: Tensor, k: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
        r"""The two terms of :meth:`log_weights`, each ``(k, batch)``: :math:`\log p(x \mid z_i)` and
        :math:`\log p(z_i) - \log q(z_i \mid x)`."""
        x = self.check_data(x)
        k = check_count("k", k)
        if chunk is not None:
            check_count("chunk", chunk)
        batch = x.shape[0]
        if batch == 0:
            return x.new_zeros(k, 0), x.new_zeros(k, 0)
        per_pass = chunk or max(1, CHUNK_ROWS // batch)
        mu, log_sigma, h = self.encode(x)
        # All the noise at once (k x batch x latent numbers, small next to the decoder's output), so
        # that the result for a seed does not depend on the chunk size.
        noise = torch.randn(k, batch, self.latent, dtype=mu.dtype, device=mu.device)
        reconstruction, latent = [], []
        for eps in noise.split(per_pass):
            z, log_q = self._push(eps, mu, log_sigma, h)
            reconstruction.append(self._log_likelihood(x, z))
            latent.append(self._prior_log_prob(z) - log_q)
        return torch.cat(reconstruction, dim=0), torch.cat(latent, dim=0)

    def elbo(self, x: Tensor, samples: int = 1, kl_weight: float = 1.0) -> Tensor:
        r"""Monte-Carlo ELBO per row, shape (batch,): the mean of ``samples`` log-weights
        :math:`\log p(x \mid z) + \log p(z) - \log q(z \mid x)`, :math:`z \sim q(z \mid x)` (an
        unbiased estimate of the ELBO; with the exact posterior every draw equals :math:`\log p(x)`).

        ``kl_weight`` :math:`\beta` scales the second part,
        :math:`\log p(x \mid z) + \beta\,[\log p(z) - \log q(z \mid x)]`, whose expectation is
        :math:`-\mathrm{KL}(q \,\|\, p)`: a KL warm-up raises it from 0 to 1 early in training
        (:class:`~flowforge.train.objectives.NegativeELBO`). Only :math:`\beta = 1` is a bound on
        :math:`\log p(x)`.
        """
        samples = check_count("samples", samples)
        check_real("kl_weight", kl_weight, non_negative=True)
        reconstruction, latent = self._weight_terms(x, samples)
        return (reconstruction + kl_weight * latent).mean(0)

    def iwae(self, x: Tensor, k: int, chunk: int | None = None) -> Tensor:
        r"""The importance-weighted bound :math:`\log \frac1k \sum_i e^{w_i}` per row, shape (batch,),
        as ``logsumexp(w) - log k`` over draws made in chunks (:meth:`log_weights`)."""
        k = check_count("k", k)
        return torch.logsumexp(self.log_weights(x, k, chunk), dim=0) - math.log(k)

    def log_prob(self, x: Tensor, context: Tensor | None = None, k: int = DEFAULT_IWAE_SAMPLES) -> Tensor:
        r"""Estimate of :math:`\log p(x)` per row: the IWAE bound with ``k`` draws (default
        ``DEFAULT_IWAE_SAMPLES`` = 1000), a stochastic lower bound in expectation. Wrap in
        ``torch.no_grad()`` for evaluation: with gradients the graph of all ``k`` draws is kept."""
        self._check_context(context)
        return self.iwae(x, k)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`elbo` with one draw (``model(x)`` goes through module hooks and DDP)."""
        self._check_context(context)
        return self.elbo(x)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        r"""``n`` draws :math:`x \sim p_\theta(x \mid z)`, :math:`z \sim p(z)`: shape ``(n, features)``,
        whole numbers in ``0..levels-1`` (in the model's dtype) for the discrete decoders."""
        n = check_sample_count(n)
        dtype, device = self._dtype(), self.decoder[-1].weight.device
        z = torch.randn(n, self.latent, dtype=dtype, device=device) if self.prior is None else self.prior.sample(n)
        out = self._decoder_output(z)
        if self.likelihood == "categorical":
            return torch.distributions.Categorical(logits=out).sample().to(dtype)
        if self.likelihood == "logistic":
            mean, log_s = self._logistic(out)
            u = torch.rand_like(mean).clamp(1e-6, 1 - 1e-6)
            y = mean + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
            return y.round().clamp(0, self.levels - 1)
        return out[..., 0] + torch.exp(self.log_scale) * torch.randn_like(out[..., 0])

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, latent={self.latent}, posterior={self.posterior_kind!r}, "
            f"prior={self.prior_kind!r}, likelihood={self.likelihood!r}, levels={self.levels}"
        )


__all__ = ["DEFAULT_IWAE_SAMPLES", "LIKELIHOODS", "POSTERIORS", "PRIORS", "VAE"]
