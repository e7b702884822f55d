"""Benchmark: flowforge's Glow against normflows' Glow on the 8x8 digits, in bits per dimension.

What it measures
----------------
The data are scikit-learn's 8x8 digits as images, ``digits_images("train")`` (1,438 images) and
``digits_images("test")`` (359 images): one channel, pixel counts ``k`` in 0..16 (17 levels).
Every model sees dequantized images ``y = (k + u) / 17`` in [0, 1), ``u ~ U(0, 1)`` per pixel, and
is trained by the shared loop of ``benchmarks/common.py`` (Adam at lr 1e-3, cosine decay to 0,
gradient-norm clipping at 10) on the negated one-draw lower bound
``log p(y) - 64 log 17`` on the discrete log-likelihood. The models:

1. ``ff-glow``: flowforge ``Glow((1, 8, 8), levels=L, steps=K, hidden_channels=H)`` in
   ``Dequantized(..., 17)``;
2. ``ff-realnvp``: flowforge ``MultiscaleRealNVP((1, 8, 8), levels=L, steps=S, hidden_channels=H)``
   in ``Dequantized(..., 17)``; ``S`` (``--realnvp-steps``) defaults to ``round(L K / (2L - 1))``,
   so that it has about as many couplings as the Glow (``S (2L - 1)`` against ``L K``);
3. ``ff-glow-vdeq``: the same flowforge Glow in ``Dequantized(..., 17, variational=True)`` (learned
   dequantization noise ``q(u | k)``; its number is the variational bound, which is tighter than the
   uniform one at the same density);
4. ``nf-glow``: normflows' Glow with the same ``L``, ``K`` and ``H``, assembled as in normflows' own
   Glow example: per level ``K`` ``GlowBlock`` s (affine coupling with a conv3x3-conv1x1-conv3x3 net,
   invertible 1x1 convolution, ActNorm) and a ``Squeeze``; a ``Merge`` between levels; a ``GlowBase``
   (learned per-channel diagonal Gaussian) over each level's latent; ``MultiscaleFlow`` on top.

All share, per seed: the minibatch indices (``--steps`` x ``--batch``, drawn up front), the
uniform noise of every step (``torch.manual_seed`` is reset right before training, and the
uniform-noise models draw nothing else from the global generator while training), and
``torch.manual_seed(seed)`` right before each model is built.

ActNorm layers of both libraries initialise from data on the first training batch: flowforge's on
the first training-mode forward (data -> noise) pass, normflows' on the first call in either
direction. Nothing evaluates or samples a model before its first training step, so for both that
first call is ``log_prob`` of the first minibatch.

Recorded per seed and model, after training (``eval`` mode, no grad): test bits/dim
``-(log p(y) - 64 log 17) / (64 ln 2)`` averaged over the test images and ``--draws`` (4) noise
draws (flowforge: ``Dequantized.bits_per_dim``; normflows: that formula on
``MultiscaleFlow.log_prob``), the number of trainable parameters, the median wall time of one
training step and the total training time. The table gives every flowforge model's bits/dim and
step time relative to normflows' Glow; the goal is ``ff-glow`` bits/dim below ``nf-glow``'s.

Differences that remain between the Glows (both are printed through parameter counts): flowforge
factors out half of the channels under a learned conditional Gaussian prior (a small conv net of the
kept channels, as in the Glow paper), normflows under a per-channel Gaussian (``GlowBase``);
flowforge's coupling bounds its log-scale with a soft clamp, normflows' uses Glow's sigmoid scale;
flowforge alternates which half of the channels a coupling transforms, normflows always transforms
the same half (the 1x1 convolutions mix in between).

A PNG grid of samples (8 x 8 digits per model, ``floor(17 y)`` clamped to 0..16, temperature 1)
next to 64 held-out test digits is written to ``benchmarks/results/glow_digits_samples.png``; the
table goes to ``benchmarks/results/glow_digits.json``. PyTorch runs with ``--threads`` threads
(default 1).

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for normflows) and matplotlib::

    python benchmarks/glow_digits.py
    python benchmarks/glow_digits.py --steps 500 --levels 2 --flow-steps 2 --hidden 32 --models ff-glow nf-glow

The defaults (1 seed x 4 models x 1200 steps of batch 64, L=2, K=4, H=64) take about 9 minutes on
a 2-core CPU machine with 1 thread.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import normflows as nf
import torch
from torch import Tensor, nn

from common import (
    CLIP_NORM,
    LR,
    RESULTS_DIR,
    batch_indices,
    fit,
    parameter_count,
    positive_int,
    seed_int,
    write_results,
)
from flowforge.data import digits_images
from flowforge.flows import Dequantized, Glow, MultiscaleRealNVP

LEVELS = 17  # pixel values 0..16
SHAPE = (1, 8, 8)
DIMS = math.prod(SHAPE)
RESULTS = RESULTS_DIR / "glow_digits.json"
SAMPLES_PNG = RESULTS_DIR / "glow_digits_samples.png"
REFERENCE = "nf-glow"


class Model:
    """What the benchmark needs of a model: the training loss, test bits/dim and integer samples."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def log_prob(self, k: Tensor) -> Tensor:
        """One-draw lower bound on log P(k) in nats, per image."""
        raise NotImplementedError

    def bits_per_dim(self, k: Tensor, draws: int) -> float:
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        raise NotImplementedError


class FlowforgeModel(Model):
    module: Dequantized

    def log_prob(self, k: Tensor) -> Tensor:
        return self.module.log_prob(k)

    def bits_per_dim(self, k: Tensor, draws: int) -> float:
        return self.module.bits_per_dim(k, draws=draws)

    def sample(self, n: int) -> Tensor:
        return self.module.sample(n)


class NormflowsModel(Model):
    module: nf.MultiscaleFlow

    def log_prob(self, k: Tensor) -> Tensor:
        y = (k + torch.rand_like(k)) / LEVELS
        return self.module.log_prob(y, None) - DIMS * math.log(LEVELS)

    @torch.no_grad()
    def bits_per_dim(self, k: Tensor, draws: int) -> float:
        total = sum(float(self.log_prob(k).mean()) for _ in range(draws)) / draws
        return -total / (DIMS * math.log(2))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        y, _ = self.module.sample(n)
        return (y * LEVELS).floor().clamp(0, LEVELS - 1)


def realnvp_steps(args: argparse.Namespace) -> int:
    """Couplings per mask type and scale of ``ff-realnvp``: as many couplings as the Glow, rounded."""
    if args.realnvp_steps is not None:
        return args.realnvp_steps
    return max(1, round(args.levels * args.flow_steps / (2 * args.levels - 1)))


def build_ff_glow(args: argparse.Namespace) -> Model:
    flow = Glow(SHAPE, levels=args.levels, steps=args.flow_steps, hidden_channels=args.hidden)
    return FlowforgeModel(Dequantized(flow, LEVELS))


def build_ff_realnvp(args: argparse.Namespace) -> Model:
    flow = MultiscaleRealNVP(SHAPE, levels=args.levels, steps=realnvp_steps(args), hidden_channels=args.hidden)
    return FlowforgeModel(Dequantized(flow, LEVELS))


def build_ff_glow_vdeq(args: argparse.Namespace) -> Model:
    flow = Glow(SHAPE, levels=args.levels, steps=args.flow_steps, hidden_channels=args.hidden)
    return FlowforgeModel(Dequantized(flow, LEVELS, variational=True))


def build_nf_glow(args: argparse.Namespace) -> Model:
    """normflows' multiscale Glow for one (C, H, W) image shape.

    ``MultiscaleFlow`` runs its levels from the coarsest (index 0) to the finest in the noise ->
    data direction: level ``i`` merges its own latent into the state (``i > 0``), applies its
    GlowBlocks and unsqueezes (``Squeeze.forward`` halves the channels' factor 4 into 2x2 pixels).
    With ``L`` levels, level ``i`` works at ``L - i`` squeezes: ``C 2**(L + 1 - i)`` channels (half of
    ``4**(L - i) C``, except the coarsest, which keeps all of them), and its latent has the channels
    factored out there.
    """
    channels, height, width = SHAPE
    levels = args.levels
    bases, flows, merges = [], [], []
    for i in range(levels):
        squeezes = levels - i
        block_channels = channels * 2 ** (squeezes + 1)
        blocks: list[nf.flows.Flow] = [
            nf.flows.GlowBlock(block_channels, args.hidden, split_mode="channel", scale=True)
            for _ in range(args.flow_steps)
        ]
        blocks.append(nf.flows.Squeeze())
        flows.append(blocks)
        latent_channels = block_channels if i == 0 else block_channels // 2
        if i > 0:
            merges.append(nf.flows.Merge())
        latent_shape = (latent_channels, height // 2**squeezes, width // 2**squeezes)
        bases.append(nf.distributions.GlowBase(latent_shape))
    return NormflowsModel(nf.MultiscaleFlow(bases, flows, merges, class_cond=False))


BUILDERS: dict[str, Callable[[argparse.Namespace], Model]] = {
    "ff-glow": build_ff_glow,
    "ff-realnvp": build_ff_realnvp,
    "ff-glow-vdeq": build_ff_glow_vdeq,
    "nf-glow": build_nf_glow,
}


@dataclass
class RunResult:
    model: str
    seed: int
    test_bits_per_dim: float
    parameters: int
    median_step_s: float
    train_s: float
    final_train_bits_per_dim: float
    nonfinite_train_losses: int


def run(name: str, seed: int, args: argparse.Namespace, train_k: Tensor, test_k: Tensor) -> tuple[RunResult, Tensor]:
    indices = batch_indices(train_k.shape[0], args.steps, args.batch, seed)
    torch.manual_seed(seed)
    model = BUILDERS[name](args)
    module = model.module
    module.train()
    nonfinite = 0

    def loss_of(batch: Tensor) -> Tensor:
        nonlocal nonfinite
        loss = -model.log_prob(batch).mean()
        nonfinite += int(not torch.isfinite(loss))
        return loss

    torch.manual_seed(seed + 1)  # the same uniform noise, step by step, for every uniform-noise model
    start = time.perf_counter()
    times, last_loss = fit(list(module.parameters()), loss_of, train_k, indices)
    train_s = time.perf_counter() - start
    module.eval()
    torch.manual_seed(seed + 2)  # the same test noise for all
    with torch.no_grad():
        bpd = model.bits_per_dim(test_k, args.draws)
        samples = model.sample(64)
    result = RunResult(
        model=name,
        seed=seed,
        test_bits_per_dim=bpd if math.isfinite(bpd) else math.inf,
        parameters=parameter_count(module),
        median_step_s=statistics.median(times),
        train_s=train_s,
        final_train_bits_per_dim=last_loss / (DIMS * math.log(2)),
        nonfinite_train_losses=nonfinite,
    )
    return result, samples


def summarize(results: list[RunResult], models: Sequence[str]) -> dict[str, dict[str, float | bool]]:
    def median_of(model: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results if r.model == model)

    summary: dict[str, dict[str, float | bool]] = {}
    for model in models:
        row: dict[str, float | bool] = {
            "median_test_bits_per_dim": median_of(model, "test_bits_per_dim"),
            "median_step_s": median_of(model, "median_step_s"),
            "parameters": median_of(model, "parameters"),
        }
        if REFERENCE in models:
            row["bits_per_dim_ratio"] = row["median_test_bits_per_dim"] / median_of(REFERENCE, "test_bits_per_dim")
            row["step_time_ratio"] = row["median_step_s"] / median_of(REFERENCE, "median_step_s")
        summary[model] = row
    if "ff-glow" in models and REFERENCE in models:
        summary["goal"] = {
            "ff_glow_minus_nf_glow_bits_per_dim": summary["ff-glow"]["median_test_bits_per_dim"]
            - summary[REFERENCE]["median_test_bits_per_dim"],
            "pass": summary["ff-glow"]["median_test_bits_per_dim"] < summary[REFERENCE]["median_test_bits_per_dim"],
        }
    return summary


def print_table(results: list[RunResult], summary: dict[str, dict[str, float | bool]], models: Sequence[str]) -> None:
    seeds = sorted({r.seed for r in results})
    by_key = {(r.model, r.seed): r for r in results}
    print(f"{'model':<13} {'seed':>4}  {'test bits/dim':>13}  {'params':>8}  {'ms/step':>8}  {'train s':>7}")
    for model in models:
        for s in seeds:
            r = by_key[model, s]
            print(
                f"{model:<13} {s:>4}  {r.test_bits_per_dim:>13.4f}  {r.parameters:>8d}  "
                f"{r.median_step_s * 1e3:>8.1f}  {r.train_s:>7.0f}"
            )
    if REFERENCE not in models:
        return
    print(f"\nmedian over seeds, relative to {REFERENCE}:")
    print(f"{'model':<13}  {'bits/dim':>8}  {'bpd ratio':>9}  {'step time ratio':>15}")
    for model in models:
        row = summary[model]
        print(
            f"{model:<13}  {row['median_test_bits_per_dim']:>8.4f}  {row['bits_per_dim_ratio']:>9.3f}  "
            f"{row['step_time_ratio']:>15.2f}"
        )
    if "goal" in summary:
        goal = summary["goal"]
        verdict = "PASS" if goal["pass"] else "FAIL"
        print(
            f"goal ff-glow bits/dim < nf-glow bits/dim: diff {goal['ff_glow_minus_nf_glow_bits_per_dim']:+.4f} "
            f"-> {verdict}"
        )


def mosaic(images: Tensor, rows: int = 8, gap: int = 1) -> Tensor:
    """(n, 1, h, w) images as one (rows (h + gap) - gap, cols (w + gap) - gap) picture, gaps blank."""
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    out = torch.zeros(rows * (h + gap) - gap, cols * (w + gap) - gap)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = images[i, 0]
    return out


def save_samples(panels: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, images) in zip(axes, panels.items(), strict=True):
        ax.imshow(mosaic(images).numpy(), cmap="gray_r", vmin=0, vmax=LEVELS - 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=positive_int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--batch", type=positive_int, default=64, help="minibatch size (default 64)")
    parser.add_argument("--levels", type=positive_int, default=2, help="scales L (default 2)")
    parser.add_argument("--flow-steps", type=positive_int, default=4, help="Glow steps K per scale (default 4)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden channels H (default 64)")
    parser.add_argument(
        "--realnvp-steps",
        type=positive_int,
        default=None,
        help="MultiscaleRealNVP steps S (default round(L K / (2L - 1)))",
    )
    parser.add_argument(
        "--draws", type=positive_int, default=4, help="dequantization draws for test bits/dim (default 4)"
    )
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS), help="models to run")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # normflows' LU-parametrised 1x1 convolution calls the deprecated torch.lu at every step.
    warnings.filterwarnings("ignore", message="torch.lu is deprecated", category=UserWarning)
    torch.set_num_threads(args.threads)
    train_k, _ = digits_images("train")
    test_k, _ = digits_images("test")
    print(
        f"Glow on 8x8 digits ({train_k.shape[0]} train / {test_k.shape[0]} test, {LEVELS} levels): "
        f"L={args.levels}, K={args.flow_steps}, H={args.hidden}, realnvp S={realnvp_steps(args)}, "
        f"steps={args.steps}, batch={args.batch}, seeds={args.seeds}, torch threads={torch.get_num_threads()}"
    )
    results: list[RunResult] = []
    panels: dict[str, Tensor] = {}
    for seed in args.seeds:
        for name in args.models:
            result, samples = run(name, seed, args, train_k, test_k)
            results.append(result)
            if seed == args.seeds[0]:
                panels[name] = samples
            warn = f", {result.nonfinite_train_losses} non-finite train losses" if result.nonfinite_train_losses else ""
            print(
                f"  seed {seed} {name:<13} test bits/dim {result.test_bits_per_dim:.4f} ({result.train_s:.0f} s{warn})",
                flush=True,
            )
    panels["held-out data"] = test_k[:64]
    summary = summarize(results, args.models)
    print_table(results, summary, args.models)

    payload = {
        "config": {
            "data": "digits_images (8x8, 1 channel)",
            "levels_of_pixels": LEVELS,
            "n_train": train_k.shape[0],
            "n_test": test_k.shape[0],
            "glow_levels": args.levels,
            "glow_steps": args.flow_steps,
            "hidden_channels": args.hidden,
            "realnvp_steps": realnvp_steps(args),
            "steps": args.steps,
            "batch": args.batch,
            "draws": args.draws,
            "seeds": list(args.seeds),
            "lr": LR,
            "clip_norm": CLIP_NORM,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "normflows": nf.__version__,
        },
        "runs": [asdict(r) for r in results],
        "summary": summary,
    }
    write_results(RESULTS, payload)
    save_samples(panels, SAMPLES_PNG)


if __name__ == "__main__":
    main()
