"""Models compile as one graph (``torch.compile``) once the NaN/inf scan is off.

A value read back to the host (``bool(tensor)``, ``.item()``) or an opaque call (a TorchScript
function) splits a compiled function into pieces, and ``fullgraph=True`` refuses it. The checks of
shapes and dtypes read only metadata and stay on; the scan of values is the documented switch
(``flowforge.validation.checks(finite=False)``). ``backend="eager"`` traces without generating code,
so each case costs a trace, not a compilation, and the compiled call is compared with the module's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flowforge.distributions import StandardNormal
from flowforge.flows import MAF, Flow, Glow, RealNVP
from flowforge.matching import FlowMatcher
from flowforge.nn import VelocityMLP
from flowforge.transforms import ActNorm
from flowforge.validation import checks

# The solvers' stage times are cached per grid; traced, they are simply computed again.
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    with checks(finite=False):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "make",
    [
        lambda: RealNVP(features=3, context=2, transforms=2, hidden=(8,)),
        lambda: MAF(3, context=2, transforms=2, hidden=(8,)),
    ],
    ids=["realnvp", "maf"],
)
def test_a_flows_log_prob_and_sample_compile_whole(make) -> None:
    flow = make()
    x, c = torch.randn(6, 3), torch.randn(6, 2)
    log_prob = torch.compile(flow.log_prob, backend="eager", fullgraph=True)
    torch.testing.assert_close(log_prob(x, c), flow.log_prob(x, c))
    torch.manual_seed(0)
    drawn = torch.compile(flow.sample, backend="eager", fullgraph=True)(4, c)
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, flow.sample(4, c))


def test_actnorm_initialises_inside_a_compiled_first_step_as_in_eager() -> None:
    """ActNorm sets its shift and scale from the first training batch: compiled, that happens on
    the device, with the same result, and a later batch leaves them alone."""
    torch.manual_seed(0)
    eager = Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8)
    compiled = copy.deepcopy(eager)
    log_prob = torch.compile(compiled.log_prob, backend="eager", fullgraph=True)
    for scale in (4.0, 0.5):  # the second batch must not initialise again
        x = torch.rand(8, 1, 8, 8) * scale
        torch.testing.assert_close(log_prob(x), eager.log_prob(x))
    for (name, value), expected in zip(compiled.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected, msg=name)


def test_a_loaded_actnorm_trains_compiled_from_a_batch_of_one() -> None:
    """A layer loaded already initialised knows it from the load, so a compiled training step does
    not initialise again, and takes any batch, as eager does."""
    torch.manual_seed(0)
    trained = Flow(StandardNormal(2), ActNorm(2)).train()
    trained.log_prob(torch.randn(16, 2) * 3 + 1)  # the first training batch initialises the layer
    loaded = Flow(StandardNormal(2), ActNorm(2)).train()
    loaded.load_state_dict(trained.state_dict())
    one = torch.randn(1, 2)
    log_prob = torch.compile(loaded.log_prob, backend="eager", fullgraph=True)
    torch.testing.assert_close(log_prob(one), trained.log_prob(one))


def test_flow_matching_samples_compile_whole_on_every_call() -> None:
    """The fixed-step sampler's TorchScript fast path (built on a second call) is left to the
    compiler when compiling, so later calls stay one graph."""
    matcher = FlowMatcher(VelocityMLP(2, hidden=(16,)), event_shape=2).eval()
    sample = torch.compile(matcher.sample, backend="eager", fullgraph=True)
    for seed in range(3):
        torch.manual_seed(seed)
        drawn = sample(5, steps=4)
        torch.manual_seed(seed)
        torch.testing.assert_close(drawn, matcher.sample(5, steps=4))
