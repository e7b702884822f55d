"""Fixed-step solvers: order of convergence, per-sample times, time reversal, argument checks."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from flowforge.ode import TABLEAUS, ButcherTableau, ODESolverError, odeint

# dx/dt = A x with a damped rotation: x(t) = expm(A t) x0 exactly.
A = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=torch.float64)


def _linear(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert t.shape == (x.shape[0],), "the field must receive one time per sample"
    return x @ A.T


@pytest.mark.parametrize("method", list(TABLEAUS))
def test_reaches_its_order_of_convergence(method: str) -> None:
    x0 = torch.tensor([[1.0, 0.5], [-2.0, 1.0]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(A * 2.0).T
    errors = [float((odeint(_linear, x0, (0.0, 2.0), method, steps) - exact).abs().max()) for steps in (40, 80, 160)]
    observed = [math.log2(e0 / e1) for e0, e1 in itertools.pairwise(errors)]
    order = TABLEAUS[method].order
    assert all(abs(p - order) < 0.2 for p in observed), f"{method}: observed orders {observed}, expected {order}"


@pytest.mark.parametrize("method", list(TABLEAUS))
def test_time_dependent_field(method: str) -> None:
    """dx/dt = cos(t): every method of order >= 2 integrates it to O(h^order); Euler to O(h)."""
    x0 = torch.zeros(3, 1, dtype=torch.float64)
    x1 = odeint(lambda x, t: torch.cos(t)[:, None].expand_as(x), x0, (0.0, 1.5), method, steps=200)
    tol = 5e-3 if TABLEAUS[method].order == 1 else 1e-5
    torch.testing.assert_close(x1, torch.full_like(x0, math.sin(1.5)), rtol=0, atol=tol)


def test_per_sample_start_and_end_times() -> None:
    x0 = torch.randn(4, 2, dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.7, 0.0, 2.0], dtype=torch.float64)

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _linear(x, t) * (1 + t)[:, None]  # time-dependent, so times must not be mixed up

    together = odeint(field, x0, (t0, t1), "rk4", steps=50)
    for i in range(4):
        alone = odeint(field, x0[i : i + 1], (float(t0[i]), float(t1[i])), "rk4", steps=50)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)


def test_backwards_integration_undoes_forwards() -> None:
    x0 = torch.randn(5, 2, dtype=torch.float64)
    x1 = odeint(_linear, x0, (0.0, 1.0), "rk4", steps=200)
    torch.testing.assert_close(odeint(_linear, x1, (1.0, 0.0), "rk4", steps=200), x0, rtol=0, atol=1e-9)


def test_gradients_flow_through_the_solver() -> None:
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0 = torch.ones(2, 1, dtype=torch.float64)
    x1 = odeint(lambda x, t: -scale * x, x0, (0.0, 1.0), "rk4", steps=50)
    (grad,) = torch.autograd.grad(x1.sum(), scale)
    torch.testing.assert_close(grad, torch.tensor(-2 * math.exp(-0.7), dtype=torch.float64), rtol=1e-7, atol=0)


def test_bad_arguments() -> None:
    x0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="unknown method 'dopri9'"):
        odeint(_linear, x0, (0.0, 1.0), "dopri9")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        odeint(_linear, x0, (0.0, 1.0), "euler", steps=0)
    with pytest.raises(ValueError, match=r"t0 must be a scalar or a tensor of shape \(3,\)"):
        odeint(_linear, x0, (torch.zeros(2), 1.0), "euler")
    with pytest.raises(ValueError, match="not an explicit"):
        ButcherTableau("broken", 1, (0.0, 1.0), ((),), (1.0,))
    with pytest.raises(ValueError, match="must sum to 1"):
        ButcherTableau("broken", 1, (0.0,), ((),), (0.5,))


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_reaches_the_exact_solution_at_its_tolerance(method: str) -> None:
    x0 = torch.tensor([[1.0, 0.5], [-2.0, 1.0]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(A * 2.0).T
    for tol, bound in ((1e-4, 1e-2), (1e-9, 1e-5)):  # global error: a few thousand times the local tolerance
        x1 = odeint(_linear, x0, (0.0, 2.0), method, atol=tol, rtol=tol)
        assert float((x1 - exact).abs().max()) < bound


def test_adaptive_per_sample_times_match_fixed_step() -> None:
    x0 = torch.randn(3, 2, dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.7, -0.5], dtype=torch.float64)

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _linear(x, t) * (1 + t.square())[:, None]

    adaptive = odeint(field, x0, (t0, t1), "dopri5", atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(adaptive, odeint(field, x0, (t0, t1), "rk4", steps=2000), rtol=0, atol=1e-8)


def test_float32_state_keeps_float32() -> None:
    x1 = odeint(lambda x, t: -x * t[:, None], torch.ones(4, 3), (0.0, 1.0), "dopri5")
    assert x1.dtype == torch.float32
    torch.testing.assert_close(x1, torch.full((4, 3), math.exp(-0.5)), rtol=0, atol=1e-4)


class _Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def test_adjoint_gradients_match_direct_backprop() -> None:
    torch.manual_seed(0)
    field = _Field().double()
    x0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    grads = []
    for adjoint in (False, True):
        x1 = odeint(field, x0, (0.0, 1.0), "dopri5", atol=1e-10, rtol=1e-10, adjoint=adjoint)
        grads.append(torch.autograd.grad(x1.square().sum(), (x0, *field.parameters())))
    for direct, adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-7)


def test_a_blow_up_is_a_clear_error() -> None:
    """dx/dt = x^2 from x0 = 1 blows up at t = 1: the solver must say so, not assert."""
    with pytest.raises(ODESolverError, match="dopri5 gave up"):
        odeint(lambda x, t: x.square(), torch.ones(1, 1, dtype=torch.float64), (0.0, 2.0), "dopri5", max_steps=500)


def test_an_adjoint_backward_solve_that_runs_out_of_steps_is_a_clear_error() -> None:
    """The forward solve fits in max_steps; the backward one (state, adjoint and parameter
    gradients together) does not, and must say so as the forward one would, not assert."""

    class Wavy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 5 * torch.sin(self.w * x)

    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x1 = odeint(Wavy(), x0, (0.0, 1.0), "dopri5", adjoint=True, max_steps=30, atol=1e-7, rtol=1e-7)
    with pytest.raises(ODESolverError, match=r"in the adjoint's backward solve: max_num_steps exceeded"):
        x1.sum().backward()


def test_adaptive_bad_arguments() -> None:
    with pytest.raises(ValueError, match="adjoint=True needs an adaptive method"):
        odeint(_linear, torch.zeros(2, 2), (0.0, 1.0), "rk4", adjoint=True)
    with pytest.raises(ValueError, match=r"adjoint=True needs f to be an nn\.Module"):
        odeint(_linear, torch.zeros(2, 2), (0.0, 1.0), "dopri5", adjoint=True)


def test_bad_solver_inputs_are_refused_at_entry() -> None:
    """Tolerances, times and starts that would give a wrong answer silently are refused, naming them."""
    from flowforge.ode.sde import sdeint

    def decay(x, t):
        return -x

    ones = torch.ones(2, 1)
    cases = [
        (lambda: odeint(decay, ones, (0.0, 1.0), "dopri5", atol=-1.0), ValueError, "atol must be a finite number > 0"),
        (lambda: odeint(decay, ones, (0.0, 1.0), "bosh3", rtol=0.0), ValueError, "rtol must be a finite number > 0"),
        (lambda: odeint(decay, ones, (0.0, float("nan")), "rk4"), ValueError, "t1 must be a finite number, got nan"),
        (lambda: odeint(decay, ones, (torch.tensor([0.0, float("inf")]), 1.0), "dopri5"), ValueError, "t0 must hold"),
        (lambda: odeint(decay, torch.ones(2, 1, dtype=torch.long), (0.0, 1.0)), TypeError, "x0 must be a floating"),
        (lambda: odeint(decay, torch.full((2, 1), float("nan")), (0.0, 1.0)), ValueError, "x0 contains NaN"),
        (lambda: odeint(lambda x, t: x**2, torch.full((2, 1), 5.0), (0.0, 1.0), "rk4"), ODESolverError, "NaN or inf"),
        (lambda: sdeint(decay, decay, ones, (0.0, float("inf"))), ValueError, "t1 must be a finite number, got inf"),
        (lambda: sdeint(decay, decay, ones, (0.0, 1.0), generator=5), TypeError, "generator must be a torch.Generator"),
        (lambda: sdeint(decay, decay, ones, (0.0,)), ValueError, r"t_span must be \(start, end\), got \(0.0,\)"),
        (lambda: sdeint(decay, decay, ones, (0, 1), 2, noise=[[1.0]]), TypeError, "noise must be a torch.Tensor"),
        (lambda: sdeint(decay, decay, ones, (0, 1), 2, noise=torch.ones(2, 2, 1).long()), TypeError, "noise must be a"),
        (
            lambda: sdeint(decay, decay, ones, (0, 1), 2, noise=torch.full((2, 2, 1), float("nan"))),
            ValueError,
            "noise holds",
        ),
        (
            lambda: sdeint(lambda x, t: x**3, decay, torch.full((2, 1), 9.0), (0.0, 1.0), 5),
            ODESolverError,
            "NaN or inf",
        ),
        (lambda: odeint(lambda x, t: x[:, :1], torch.ones(2, 2), (0.0, 1.0), "rk4"), ValueError, r"f returned \(2, 1"),
        (lambda: odeint(lambda x, t: x[:, :1], torch.ones(2, 2), (torch.zeros(2), 1.0)), ValueError, "a velocity has"),
        (lambda: odeint(lambda x, t: x[:, :1], torch.ones(2, 2), (0, 1), "dopri5"), ValueError, r"f returned \(2, 1"),
        (lambda: sdeint(lambda x, t: x[:, 0], decay, torch.ones(2, 2), (0, 1)), ValueError, r"drift returned \(2,\)"),
        (lambda: sdeint(decay, lambda x, t: torch.ones(3), torch.ones(2, 2), (0, 1)), ValueError, "diffusion returned"),
        (lambda: sdeint(decay, lambda x, t: torch.ones(2, 2, 2), torch.ones(2, 2), (0, 1)), ValueError, "broadcasts"),
        (lambda: odeint(decay, ones, 0.5), ValueError, r"t_span must be \(t0, t1\), got 0\.5"),
        (lambda: odeint(decay, ones, (0.0, 1e300), "rk4"), ValueError, r"t1 = 1e\+300: beyond the range of"),
        (lambda: odeint(decay, ones, (-3e38, 3e38), "rk4"), ValueError, r"t1 - t0 = 6e\+38: beyond the range of"),
        (lambda: odeint(decay, ones, (0.0, 1e300), "dopri5"), ValueError, r"t1 = 1e\+300: beyond the range of"),
        (lambda: odeint(decay, ones, (0.0, 1.0), "rk4", max_steps=5), ValueError, "max_steps = 5: rk4 takes exactly"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_setting_the_method_would_not_read_is_refused_not_dropped() -> None:
    """steps of an adaptive method, tolerances of a fixed-step one: each refused by name, at every
    entry that takes them, and a config saved before the rule still rebuilds."""
    from flowforge.flows import CNF
    from flowforge.matching import FlowMatcher
    from flowforge.matching.functional import integrate
    from flowforge.nn import VelocityMLP
    from flowforge.ode import solver_settings
    from flowforge.registry import from_config

    assert solver_settings("rk4") == (10, None, None)
    assert solver_settings("rk4", default_steps=50) == (50, None, None)
    assert solver_settings("dopri5", rtol=1e-3) == (None, 1e-5, 1e-3)
    ones = torch.ones(2, 1)
    matcher = FlowMatcher(VelocityMLP(1, hidden=(4,)))
    cnf = CNF(1, hidden=(4,), method="rk4", steps=3)
    adaptive_steps = "steps = 8: method 'dopri5' chooses its own steps"
    fixed_tolerance = "atol = 0.001: method 'rk4' takes equal steps and reads no tolerance"
    cases = [
        (lambda: odeint(_linear, ones, (0.0, 1.0), "dopri5", 8), adaptive_steps),
        (lambda: odeint(_linear, ones, (0.0, 1.0), "rk4", atol=1e-3), fixed_tolerance),
        (lambda: integrate(_linear, ones, method="dopri5", steps=8), adaptive_steps),
        (lambda: matcher.sample(2, steps=8, method="dopri5"), adaptive_steps),
        (lambda: matcher.sample(2, method="rk4", atol=1e-3), fixed_tolerance),
        (lambda: matcher.log_prob(ones, steps=8), adaptive_steps),
        (lambda: matcher.log_prob(ones, method="rk4", atol=1e-3), fixed_tolerance),
        (lambda: CNF(1, hidden=(4,), steps=8), adaptive_steps),
        (lambda: CNF(1, hidden=(4,), method="rk4", atol=1e-3), fixed_tolerance),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    # before the rule every CNF saved all three; rebuilt, the method keeps what it reads
    saved = cnf.to_config()
    saved["arguments"].update(atol=1e-5, rtol=1e-5)
    rebuilt = from_config(saved)
    assert (rebuilt.transform.steps, rebuilt.transform.atol, rebuilt.transform.rtol) == (3, None, None)
    saved["arguments"].update(method="dopri5", steps=20, atol=1e-4)
    rebuilt = from_config(saved)
    assert (rebuilt.transform.steps, rebuilt.transform.atol, rebuilt.transform.rtol) == (None, 1e-4, 1e-5)
    # the defaults fill in what the method reads: 50 fixed steps for a likelihood, as documented
    x = torch.randn(3, 1)
    torch.testing.assert_close(matcher.log_prob(x, method="rk4"), matcher.log_prob(x, method="rk4", steps=50))


def test_a_scalar_time_tensor_keeps_its_gradient_through_a_fixed_step_solve() -> None:
    # x(t1) = x0 exp(-t1): d/dt1 sum(x(t1)) = -2 exp(-1) at t1 = 1 for two ones
    for method, steps in (("rk4", 20), ("dopri5", None)):
        t1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        x0 = torch.ones(2, 1, dtype=torch.float64)
        odeint(lambda x, t: -x, x0, (0.0, t1), method, steps).sum().backward()
        assert t1.grad is not None, method
        expected = torch.tensor(-2 * math.exp(-1), dtype=torch.float64)
        torch.testing.assert_close(t1.grad, expected, rtol=1e-5 if method == "rk4" else 1e-3, atol=0)


def test_an_adaptive_solve_of_an_empty_batch_is_empty() -> None:
    end = odeint(lambda x, t: -x, torch.ones(0, 1), (0.0, 1.0), "dopri5")
    assert end.shape == (0, 1)


def test_a_shared_time_beyond_the_state_dtype_is_named() -> None:
    with pytest.raises(ValueError, match=r"t1 = 70000\.0: beyond the range of torch\.float16"):
        odeint(lambda x, t: torch.zeros_like(x), torch.zeros(2, 1, dtype=torch.float16), (60000.0, 70000.0), "euler", 4)


def test_sde_noise_takes_the_state_dtype() -> None:
    from flowforge.ode import sdeint

    end = sdeint(
        lambda x, t: -x,
        lambda x, t: torch.ones_like(x),
        torch.zeros(3, 2),
        (0.0, 1.0),
        steps=5,
        noise=torch.randn(5, 3, 2, dtype=torch.float64),
    )
    assert end.dtype == torch.float32


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_a_solve_under_inference_mode_leaves_the_time_grid_usable_with_gradients(method: str) -> None:
    class TimeEmbedded(torch.nn.Module):  # a hand-written field that keeps its time input for backward
        def __init__(self) -> None:
            super().__init__()
            self.time, self.out = torch.nn.Linear(1, 8), torch.nn.Linear(10, 2)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([x, torch.tanh(self.time(t[:, None]))], dim=1))

    field, x0 = TimeEmbedded(), torch.randn(4, 2)
    grid = (0.0, 0.7318)  # a grid no other test solves on, so this test fills its cache
    with torch.inference_mode():
        odeint(field, x0, grid, method=method, steps=7)
    odeint(field, x0, grid, method=method, steps=7).square().sum().backward()
    assert all(p.grad is not None for p in field.parameters())


def test_the_adjoint_differentiates_times_given_as_tensors_as_backpropagation_does() -> None:
    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return -self.w * x * t[:, None] + torch.sin(t)[:, None]

    field, x0 = Field(), torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gradients = []
    for adjoint in (False, True):
        t0 = torch.full((4,), 0.2, dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        end = odeint(field, x0, (t0, t1), method="dopri5", adjoint=adjoint, atol=1e-10, rtol=1e-10)
        end.square().sum().backward()
        gradients.append((t0.grad, t1.grad, field.w.grad.clone()))
        field.w.grad = None
    for direct, adjoint in zip(*gradients, strict=True):
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-8)


def test_adjoint_is_a_flag_and_a_tensor_of_times_is_refused_with_its_two_ends_suggested() -> None:
    field = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="adjoint must be a bool"):
        odeint(lambda x, t: field(x), torch.zeros(3, 2), (0.0, 1.0), method="dopri5", adjoint="no")
    with pytest.raises(ValueError, match=r"pass its two ends, \(t\[0\], t\[-1\]\)"):
        odeint(lambda x, t: -x, torch.zeros(3, 2), torch.tensor([0.0, 1.0]))
