"""Continuous normalizing flows: the instantaneous change of variables against brute force."""

from __future__ import annotations

import pytest
import torch

from flowforge.flows import CNF
from flowforge.nn import VelocityMLP
from flowforge.ode.divergence import ExactDivergence, HutchinsonDivergence, russian_roulette
from tests.invariants import autograd_logabsdet, density_mass_2d, parameters_without_gradient, randomize_


def _cnf(context: int = 0, features: int = 3, **kwargs) -> CNF:
    """A small CNF with randomised weights, in float64; rk4 with 40 steps unless told otherwise."""
    torch.manual_seed(0)
    options = {"hidden": (16, 16), "method": "rk4", **kwargs}
    if options["method"] == "rk4":  # an adaptive method takes no step count
        options.setdefault("steps", 40)
    return randomize_(CNF(features, context, **options), 0.2).double()


@pytest.mark.parametrize("context", [0, 2])
def test_exact_trace_log_det_matches_the_flow_maps_jacobian(context: int) -> None:
    flow = _cnf(context)
    x = torch.randn(50, 3, dtype=torch.float64)
    c = torch.randn(50, context, dtype=torch.float64) if context else None
    _, logabsdet = flow.transform(x, c)
    brute = autograd_logabsdet(lambda inp: flow.transform(inp, c)[0], x)
    torch.testing.assert_close(logabsdet.detach(), brute, rtol=0, atol=1e-6)
    x_back, inverse_logabsdet = flow.transform.inverse(flow.transform(x, c)[0].detach(), c)
    torch.testing.assert_close(x_back.detach(), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(inverse_logabsdet.detach(), -logabsdet.detach(), rtol=0, atol=1e-6)


def test_adaptive_solver_agrees_with_brute_force() -> None:
    flow = _cnf(method="dopri5", atol=1e-10, rtol=1e-10)
    x = torch.randn(20, 3, dtype=torch.float64)
    _, logabsdet = flow.transform(x)
    brute = autograd_logabsdet(lambda inp: flow.transform(inp)[0], x)
    torch.testing.assert_close(logabsdet.detach(), brute, rtol=0, atol=1e-6)


def test_hutchinson_is_unbiased_for_the_exact_log_density() -> None:
    exact = _cnf()
    hutchinson = _cnf(trace="hutchinson")
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        reference = exact.log_prob(x)
        draws = torch.stack([hutchinson.log_prob(x) for _ in range(300)])
    standard_error = draws.std(0) / 300**0.5
    assert ((draws.mean(0) - reference).abs() < 4 * standard_error + 1e-9).all()
    assert (draws.std(0) > 0).all(), "Hutchinson draws should vary"


def test_divergence_estimators_on_a_linear_field() -> None:
    A = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    v = x @ A.T
    torch.testing.assert_close(ExactDivergence()(v, x, create_graph=False), torch.trace(A).expand(6))
    estimates = []
    for _ in range(2000):
        hutchinson = HutchinsonDivergence("gaussian")
        hutchinson.reset(x)
        estimates.append(hutchinson(v, x, create_graph=False))
    mean = torch.stack(estimates).mean(0)
    assert (mean - torch.trace(A)).abs().max() < 4 * torch.stack(estimates).std(0).max() / 2000**0.5


@pytest.mark.parametrize("features", [2, 5])
def test_batched_and_looped_exact_divergence_agree_with_the_jacobian(features: int) -> None:
    torch.manual_seed(0)
    net = VelocityMLP(features, hidden=(8,)).double()
    x = torch.randn(3, features, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, dtype=torch.float64)
    jacobians = torch.stack(
        [torch.autograd.functional.jacobian(lambda y, i=i: net(y[None], t[i : i + 1])[0], x[i]) for i in range(3)]
    )
    results = {}
    for batched in (True, False):
        div, frob = ExactDivergence(batched)(net(x, t), x, create_graph=True, frobenius=True)
        torch.testing.assert_close(div, jacobians.diagonal(dim1=1, dim2=2).sum(-1))
        torch.testing.assert_close(frob, jacobians.square().sum((1, 2)))
        results[batched] = torch.autograd.grad((div + frob).sum(), net.parameters(), materialize_grads=True)
    for a, b in zip(results[True], results[False], strict=True):  # second-order gradients agree too
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="batched"):
        ExactDivergence("yes")


def test_exact_divergence_falls_back_to_the_loop_where_batching_fails() -> None:
    """GroupNorm's double backward has no batching rule: the batched rows fail with create_graph, and
    the divergence comes from the loop instead, equal to the Jacobian's trace and differentiable."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Unflatten(1, (2, 2, 2)), torch.nn.GroupNorm(1, 2), torch.nn.Flatten())
    net = net.double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    jacobians = torch.stack([torch.autograd.functional.jacobian(lambda y: net(y[None])[0], row) for row in x])
    divergence = ExactDivergence()
    with pytest.raises(RuntimeError):  # the failure the fallback exists for (lift this test once torch batches it)
        basis = torch.eye(8, dtype=torch.float64)[:, None].expand(8, 3, 8)
        torch.autograd.grad(net(x), x, basis, create_graph=True, is_grads_batched=True)
    result = divergence(net(x), x, create_graph=True)
    torch.testing.assert_close(result, jacobians.diagonal(dim1=1, dim2=2).sum(-1))
    assert divergence._batching_failed
    (gradient,) = torch.autograd.grad(result.sum(), x)
    assert torch.isfinite(gradient).all()


def test_sampling_and_density_are_consistent_and_differentiable() -> None:
    flow = _cnf(context=2)
    c = torch.randn(3, 2, dtype=torch.float64)
    x, log_prob = flow.sample_and_log_prob(4, c)
    assert x.shape == (4, 3, 3) and log_prob.shape == (4, 3)
    torch.testing.assert_close(
        flow.log_prob(x.reshape(-1, 3).detach(), c.repeat(4, 1)).detach(),
        log_prob.reshape(-1).detach(),
        rtol=0,
        atol=1e-6,
    )
    missing = parameters_without_gradient(
        flow, -flow.log_prob(torch.randn(16, 3, dtype=torch.float64), c.repeat(6, 1)[:16]).mean()
    )
    assert not missing, f"no gradient reaches {missing}"
    assert not flow.sample(2, c).requires_grad


def test_adjoint_gradients_match_direct_backprop() -> None:
    direct = _cnf(method="dopri5", atol=1e-9, rtol=1e-9)
    adjoint = _cnf(method="dopri5", atol=1e-9, rtol=1e-9, adjoint=True)
    x = torch.randn(8, 3, dtype=torch.float64)
    grads = [torch.autograd.grad(-f.log_prob(x).mean(), tuple(f.parameters())) for f in (direct, adjoint)]
    for g_direct, g_adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(g_adjoint, g_direct, rtol=1e-5, atol=1e-7)


def test_density_integrates_to_one() -> None:
    flow = _cnf(features=2, steps=12)
    mass = density_mass_2d(flow.log_prob, bound=8.0, resolution=160)
    assert abs(mass - 1) < 0.01, f"CNF density integrates to {mass:.4f}"


def test_russian_roulette_is_unbiased() -> None:
    generator = torch.Generator().manual_seed(0)
    for ratio, p, min_terms in ((0.5, 0.5, 1), (0.8, 0.3, 3)):
        draws = torch.stack(
            [russian_roulette(lambda k, r=ratio: torch.tensor(r**k), p, min_terms, generator) for _ in range(5000)]
        )
        exact = ratio / (1 - ratio)
        assert abs(float(draws.mean()) - exact) < 4 * float(draws.std()) / 5000**0.5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="trace must be"):
        CNF(2, trace="fast")
    with pytest.raises(ValueError, match="unknown method"):
        CNF(2, method="dopri99")
    with pytest.raises(ValueError, match="probe must be"):
        HutchinsonDivergence("uniform")


class _LinearVelocity(torch.nn.Module):
    """v(x, t) = A x, whose flow map and Jacobian are known in closed form."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.matrix.T


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_rnode_regularisers_on_a_linear_field(trace: str) -> None:
    """For v = A x: the Jacobian term is ||A||_F^2 (exact trace) and the kinetic energy is the
    integral of |A x(t)|^2 along the closed-form trajectory x(t) = expm(A (t - 1)) x."""
    torch.manual_seed(0)
    matrix = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    flow = CNF(3, hidden=(4,), trace=trace, method="rk4", steps=100).double()
    flow.transform.velocity = _LinearVelocity(matrix)
    x = torch.randn(5, 3, dtype=torch.float64)
    log_prob, kinetic, jacobian = flow.log_prob_and_regularization(x)
    if trace == "exact":  # (a Hutchinson solve draws its own probe, so two calls differ)
        torch.testing.assert_close(log_prob, flow.log_prob(x), rtol=0, atol=1e-10)
    times = torch.linspace(0, 1, 2001, dtype=torch.float64)
    path = torch.stack([x @ torch.linalg.matrix_exp(matrix * (t - 1)).T for t in times])  # (T, batch, 3)
    speed = (path @ matrix.T).square().sum(-1)
    expected_kinetic = torch.trapezoid(speed, times, dim=0)
    torch.testing.assert_close(kinetic.detach(), expected_kinetic, rtol=1e-6, atol=0)
    if trace == "exact":
        torch.testing.assert_close(jacobian.detach(), matrix.square().sum().expand(5), rtol=1e-10, atol=0)
    else:
        assert (jacobian > 0).all()


def test_nfe_is_reported_and_grows_with_tighter_tolerances() -> None:
    flow = _cnf(method="dopri5", atol=1e-3, rtol=1e-3)
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        flow.log_prob(x)
        loose = flow.last_nfe
        flow.transform.atol = flow.transform.rtol = 1e-9
        flow.log_prob(x)
        tight = flow.last_nfe
    assert 0 < loose < tight


def test_adjoint_differentiates_the_context_too() -> None:
    """A context produced by an embedding net needs its gradient from the adjoint solve as well."""
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        flow = _cnf(context=2, method="dopri5", atol=1e-9, rtol=1e-9, adjoint=adjoint)
        context = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        (grad,) = torch.autograd.grad(-flow.log_prob(x, context).mean(), context)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_sampling_integrates_the_trajectory_alone(adjoint: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sample``/``rsample`` solve for x without the trace: the same points as the augmented
    inverse (to the solver's tolerance), no divergence evaluated, and differentiable."""
    flow = _cnf(context=2, method="dopri5", atol=1e-9, rtol=1e-9, adjoint=adjoint)
    c = torch.randn(3, 2, dtype=torch.float64)
    z = torch.randn(5, 3, 3, dtype=torch.float64)
    context = c.repeat(5, 1)
    calls = []
    divergence = ExactDivergence.__call__
    with monkeypatch.context() as patch:
        patch.setattr(ExactDivergence, "__call__", lambda self, *a, **k: calls.append(1) or divergence(self, *a, **k))
        x = flow.transform.inverse_without_logdet(z.reshape(-1, 3), context)
    assert not calls, "sampling evaluated the divergence"
    expected, _ = flow.transform.inverse(z.reshape(-1, 3), context)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-7)
    missing = parameters_without_gradient(flow, flow.rsample(4, c).square().sum())
    assert not missing, f"no gradient reaches {missing} through rsample"


def test_a_cnf_changes_its_solver_checked_and_is_saved_with_it(tmp_path) -> None:
    from flowforge.checkpoint import load_model, save_model
    from flowforge.errors import ConfigError

    flow = CNF(2, hidden=(8,))
    flow.set_solver("rk4", steps=4)
    flow.sample(2)
    save_model(tmp_path / "cnf", flow)
    loaded = load_model(tmp_path / "cnf").transform
    assert (loaded.method, loaded.steps, loaded.atol, loaded.rtol) == ("rk4", 4, None, None)
    with pytest.raises((ConfigError, ValueError), match="atol"):
        flow.set_solver("rk4", atol=1e-3)
    with pytest.raises(ValueError, match="adjoint = True, which needs an adaptive method"):
        CNF(2, hidden=(8,), adjoint=True).set_solver("euler", steps=8)
    assert flow.transform.method == "rk4"  # a refused change leaves the solver as it was
