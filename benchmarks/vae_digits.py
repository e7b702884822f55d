"""Benchmark: VAEs with a diagonal-Gaussian posterior, an IAF posterior, and an IAF posterior with a flow
prior, on the 8x8 digits, in nats per image.

What it measures
----------------
The data are scikit-learn's 8x8 digits, split as flowforge's other digits benchmarks split them
(``digits_images("train")``: 1,438 images, ``digits_images("test")``: 359 images, seed 0), flattened
to 64 pixel counts in 0..16. Every model is a :class:`flowforge.flows.vae.VAE` with the same encoder
and decoder: an MLP encoder 64 -> ``--hidden`` -> (mu, log sigma) of a ``--latent``-dimensional
diagonal Gaussian (plus a ``--context``-sized feature vector h(x) for the flow posteriors) and an MLP
decoder ``--latent`` -> reversed ``--hidden`` -> a 17-way categorical per pixel. The three
configurations differ only in the posterior and the prior:

1. ``gaussian``: q(z | x) = N(mu(x), diag sigma(x)^2), prior N(0, I) (K = 0);
2. ``iaf``: that Gaussian refined by ``--iaf-transforms`` inverse autoregressive affine layers
   (MADE conditioners with ``--flow-hidden`` widths, each fed h(x)), prior N(0, I);
3. ``iaf-flow-prior``: the same IAF posterior and a MAF prior over z (``--prior-transforms`` layers,
   ``--prior-hidden`` widths).

Each is trained by flowforge's :class:`~flowforge.train.Trainer` on the negative ELBO
(:class:`~flowforge.train.objectives.NegativeELBO`, one posterior draw per image; the KL term's weight
rising linearly from 0 to 1 over the first ``--kl-warmup-steps``, a third of the steps by default) with the same
budget: ``--steps`` Adam steps of ``--batch`` images (AdamW with ``--weight-decay``, 0 by default),
lr ``--lr`` with cosine decay to 0, gradient-norm clipping at 10, for each of ``--seeds`` (the seed
builds the model and orders the batches). With ``--validation-fraction f`` a fixed share f of the
training images is held out, the ELBO on it is checked every ``--eval-every`` steps, and the
weights of the best check are the ones evaluated (the Trainer's early-stopping weights). Every
configuration's decoder drops its hidden units with probability ``--decoder-dropout`` in training
(``VAE(decoder_dropout=p)``; off when the bounds are evaluated), and the bounds are those of an
exponential moving average of the weights with decay ``--ema-decay`` (0: the last weights).
Recorded per (configuration, seed), in eval mode without gradients: on the test images, with
``--k`` (1000) posterior draws per image, the ELBO (the mean of the draws' log-weights
log p(x, z) - log q(z | x)) and the importance-weighted bound IWAE-k = log mean exp of the same
log-weights, both in nats per image (higher is better; ``-IWAE / (64 ln 2)`` is
the bits/dim comparable with ``glow_digits.py``'s discrete bits/dim); the same two bounds on the
first 359 training images (as many as the test set), which show the generalisation gap and how much
of the ELBO's gap the posterior leaves on data it was trained on; parameters; training time.

The table gives, per configuration, the mean over seeds and the seed-to-seed spread (sample
standard deviation). Goal: the IAF posterior improves the test IWAE bound over the Gaussian posterior
by more than the seed-to-seed spread (the larger of the two configurations' standard deviations).

Sizes (the defaults): latent 16, encoder/decoder hidden widths (128, 128), IAF with 8 layers of
(128, 128) MADEs and a 32-dim h(x), MAF prior with 4 layers of (128, 128), 4,000 steps of 128
images (about 360 epochs), decoder dropout 0.4, moving average 0.999, k = 1000. Larger hidden
widths (256) overfit the 1,438 training images within 1,500 steps; without dropout, runs of more
than 3,000 steps overfit them (the README gives the settings tried). The whole run (9 trainings
and evaluations) takes about 10 minutes with one torch thread on a 2-core machine (Gaussian ~21 s,
IAF ~55 s of training per seed; ~20 s of evaluation per phase).

Every (configuration, seed) is a resumable phase: its trainer checkpoints every 500 steps under
``--work`` and resumes from there, and its result is cached as JSON in the same folder (a folder per
set of settings, so a changed setting never reuses a stale result). The summary goes to
``benchmarks/results/vae_digits.json``.

How to run
----------
::

    python benchmarks/vae_digits.py                                   # everything, one thread
    python benchmarks/vae_digits.py --steps 300 --seeds 0 --k 100     # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import (
    RESULTS_DIR,
    nonnegative_float,
    parameter_count,
    positive_float,
    positive_int,
    read_json,
    run_resumable,
    seed_int,
    write_json,
    write_results,
)
from flowforge.data import digits_images
from flowforge.flows.vae import VAE
from flowforge.train.loop import Trainer, TrainerConfig
from flowforge.train.objectives import NegativeELBO

RESULTS = RESULTS_DIR / "vae_digits.json"
CONFIGS = ("gaussian", "iaf", "iaf-flow-prior")
BASELINE, CHALLENGER = "gaussian", "iaf"
CLIP_NORM = 10.0
CHECKPOINT_EVERY = 500
KL_WARMUP_SHARE = 3  # the KL warm-up lasts a third of the steps: +1.7 nats of test IWAE for the Gaussian posterior
VALIDATION_SEED = 1
TRAIN_EVAL_ROWS = 359  # as many training images as test images
EVAL_SEED_OFFSET = 10_000
#: Part of the cache key: bump it when what a phase records changes.
RESULT_VERSION = 2


def build(name: str, args: argparse.Namespace) -> VAE:
    """The VAE of configuration ``name``: the same encoder and decoder for all three."""
    common = dict(
        latent=args.latent,
        hidden=tuple(args.hidden),
        likelihood="categorical",
        levels=17,
        decoder_dropout=args.decoder_dropout,
    )
    if name == "gaussian":
        return VAE(64, posterior="gaussian", **common)
    flow = dict(
        posterior="iaf",
        transforms=args.iaf_transforms,
        flow_hidden=tuple(args.flow_hidden),
        encoder_context=args.context,
    )
    if name == "iaf":
        return VAE(64, **flow, **common)
    return VAE(
        64,
        **flow,
        **common,
        prior="maf",
        prior_transforms=args.prior_transforms,
        prior_hidden=tuple(args.prior_hidden),
    )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a cached result depends on."""
    keys = ("steps", "batch", "lr", "latent", "hidden", "iaf_transforms", "flow_hidden", "context")
    keys += ("prior_transforms", "prior_hidden", "k")
    if args.weight_decay:  # absent when 0, so results cached before the option keep their folder
        keys += ("weight_decay",)
    if args.validation_fraction:
        keys += ("validation_fraction", "eval_every")
    if args.kl_warmup_steps:
        keys += ("kl_warmup_steps",)
    if args.ema_decay is not None:
        keys += ("ema_decay",)
    if args.decoder_dropout:
        keys += ("decoder_dropout",)
    return {"result_version": RESULT_VERSION, **{key: getattr(args, key) for key in keys}}


def work_folder(args: argparse.Namespace) -> Path:
    digest = hashlib.sha256(json.dumps(settings(args), sort_keys=True).encode()).hexdigest()[:10]
    return args.work / digest


@torch.no_grad()
def bounds(model: VAE, x: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean ELBO and mean IWAE-k over the rows of ``x`` (nats per image), from one set of k draws."""
    weights = model.log_weights(x, k)  # (k, rows)
    elbo = weights.mean(0)
    iwae = torch.logsumexp(weights, 0) - math.log(k)
    return float(elbo.mean()), float(iwae.mean())


def split_validation(train: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images without the held-out validation images, and those (None when ``fraction``
    is 0): the last ``fraction`` of a fixed permutation, the same for every configuration and seed."""
    if fraction == 0:
        return train, None
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held_out = max(1, round(fraction * train.shape[0]))
    return train[order[:-held_out]], train[order[-held_out:]]


def run_phase(name: str, seed: int, args: argparse.Namespace, train: torch.Tensor, test: torch.Tensor) -> dict:
    """Train and evaluate one (configuration, seed); cached as JSON, training resumable. With a
    validation split, the weights of the best validation ELBO (checked every ``--eval-every`` steps)
    are the ones evaluated."""
    folder = work_folder(args)
    result_path = folder / f"{name}-seed{seed}.json"
    stored = read_json(result_path)  # None when missing or cut short: trained and scored again
    if isinstance(stored, dict):
        return stored
    fit_rows, validation = split_validation(train, args.validation_fraction)
    torch.manual_seed(seed)
    model = build(name, args)
    config = TrainerConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        schedule="cosine",
        max_grad_norm=CLIP_NORM,
        seed=seed,
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=50,
        eval_every=args.eval_every if validation is not None else 0,
        progress=False,
    )
    trainer = Trainer(
        model,
        NegativeELBO(kl_warmup_steps=args.kl_warmup_steps),
        config,
        data=fit_rows,
        validation_data=validation,
        directory=folder / "runs" / f"{name}-seed{seed}",
    )
    start = time.perf_counter()
    state = trainer.fit(resume=True)
    train_s = time.perf_counter() - start
    model.eval()
    torch.manual_seed(EVAL_SEED_OFFSET + seed)
    start = time.perf_counter()
    test_elbo, test_iwae = bounds(model, test, args.k)
    train_elbo, train_iwae = bounds(model, train[:TRAIN_EVAL_ROWS], args.k)
    eval_s = time.perf_counter() - start
    losses = [row["loss"] for row in state.history if "loss" in row]
    result = {
        "config": name,
        "seed": seed,
        "test_elbo": test_elbo,
        "test_iwae": test_iwae,
        "test_iwae_bits_per_dim": -test_iwae / (64 * math.log(2)),
        "train_elbo": train_elbo,
        "train_iwae": train_iwae,
        "final_train_loss": losses[-1] if losses else None,
        "best_validation_step": best_step(state),
        "parameters": parameter_count(model),
        "train_s": train_s,  # of this process only: a resumed run counts its last part
        "eval_s": eval_s,
        "settings": settings(args),
    }
    write_json(result_path, result)
    return result


def best_step(state) -> int | None:
    """The step whose weights were kept: the best validation (None without a validation split)."""
    checks = [row for row in state.history if "validation" in row]
    return min(checks, key=lambda row: row["validation"])["step"] if checks else None


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], configs: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in configs:
        rows = [r for r in results if r["config"] == name]
        summary[name] = {
            key: {"mean": statistics.fmean(r[key] for r in rows), "std": _spread([r[key] for r in rows])}
            for key in ("test_elbo", "test_iwae", "test_iwae_bits_per_dim", "train_elbo", "train_iwae", "train_s")
        }
        summary[name]["parameters"] = rows[0]["parameters"]
        summary[name]["seeds"] = len(rows)
    if BASELINE in configs and CHALLENGER in configs:
        base, challenger = summary[BASELINE]["test_iwae"], summary[CHALLENGER]["test_iwae"]
        improvement = challenger["mean"] - base["mean"]
        spread = max(base["std"], challenger["std"])
        by_seed = {(r["config"], r["seed"]): r["test_iwae"] for r in results}
        paired = [
            by_seed[CHALLENGER, seed] - by_seed[BASELINE, seed]
            for seed in sorted({r["seed"] for r in results})
            if (CHALLENGER, seed) in by_seed and (BASELINE, seed) in by_seed
        ]
        summary["goal"] = {
            "statement": "IAF improves the test IWAE bound over the Gaussian posterior by more than the seed spread",
            "iaf_minus_gaussian_iwae": improvement,
            "seed_spread": spread,
            "per_seed_differences": paired,
            "pass": improvement > spread,
        }
    return summary


def print_table(results: list[dict], summary: dict[str, Any], configs: Sequence[str], k: int) -> None:
    print(
        f"\n{'config':<15} {'seed':>4}  {'test ELBO':>9}  {'test IWAE':>9}  {'bits/dim':>8}  "
        f"{'train ELBO':>10}  {'train IWAE':>10}"
    )
    for r in results:
        print(
            f"{r['config']:<15} {r['seed']:>4}  {r['test_elbo']:>9.2f}  {r['test_iwae']:>9.2f}  "
            f"{r['test_iwae_bits_per_dim']:>8.4f}  {r['train_elbo']:>10.2f}  {r['train_iwae']:>10.2f}"
        )
    print(f"\nmean +- seed std (nats per test image; higher is better), k = {k}")
    print(
        f"{'config':<15} {'test ELBO':>15}  {'test IWAE':>15}  {'bits/dim':>8}  {'IWAE-ELBO':>9}  "
        f"{'train ELBO':>10}  {'train IWAE':>10}  {'params':>7}  {'train s':>7}"
    )
    for name in configs:
        s = summary[name]
        print(
            f"{name:<15} {s['test_elbo']['mean']:>8.2f} +- {s['test_elbo']['std']:<4.2f}  "
            f"{s['test_iwae']['mean']:>8.2f} +- {s['test_iwae']['std']:<4.2f}  "
            f"{s['test_iwae_bits_per_dim']['mean']:>8.4f}  {s['test_iwae']['mean'] - s['test_elbo']['mean']:>9.2f}  "
            f"{s['train_elbo']['mean']:>10.2f}  {s['train_iwae']['mean']:>10.2f}  "
            f"{s['parameters']:>7d}  {s['train_s']['mean']:>7.0f}"
        )
    if "goal" in summary:
        goal = summary["goal"]
        verdict = "PASS" if goal["pass"] else "FAIL"
        per_seed = ", ".join(f"{d:+.2f}" for d in goal["per_seed_differences"])
        print(
            f"goal: IAF - Gaussian test IWAE = {goal['iaf_minus_gaussian_iwae']:+.2f} nats vs seed spread "
            f"{goal['seed_spread']:.2f} -> {verdict} (per seed: {per_seed})"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/vae_digits"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=4000)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW's decoupled weight decay")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="share of the training images held out to keep the weights of the best validation ELBO (0: none)",
    )
    parser.add_argument("--eval-every", type=positive_int, default=100, help="steps between validations")
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.999,
        help="evaluate an exponential moving average of the weights with this decay (0: the last weights)",
    )
    parser.add_argument(
        "--kl-warmup-steps",
        type=int,
        default=None,
        help="steps over which the ELBO's KL weight rises from 0 to 1 (default: a third of --steps; 0: none)",
    )
    parser.add_argument("--latent", type=positive_int, default=16)
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[128, 128], help="encoder widths (decoder reversed)"
    )
    parser.add_argument(
        "--decoder-dropout",
        type=float,
        default=0.4,
        help="dropout probability after the decoder's hidden activations, in training only (0: none)",
    )
    parser.add_argument("--iaf-transforms", type=positive_int, default=8)
    parser.add_argument("--flow-hidden", type=positive_int, nargs="+", default=[128, 128], help="IAF MADE widths")
    parser.add_argument("--context", type=positive_int, default=32, help="size of the encoder's h(x)")
    parser.add_argument("--prior-transforms", type=positive_int, default=4)
    parser.add_argument("--prior-hidden", type=positive_int, nargs="+", default=[128, 128])
    parser.add_argument("--k", type=positive_int, default=1000, help="importance samples of the test IWAE bound")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        parser.error(f"--weight-decay {args.weight_decay}: need a finite number >= 0")
    if not 0 <= args.validation_fraction < 0.5:
        parser.error(f"--validation-fraction {args.validation_fraction}: need a number in [0, 0.5)")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay {args.ema_decay}: need a number in [0, 1) (0: the last weights)")
    if args.ema_decay == 0:
        args.ema_decay = None
    if not 0 <= args.decoder_dropout < 1:
        parser.error(f"--decoder-dropout {args.decoder_dropout}: need a probability in [0, 1)")
    if args.kl_warmup_steps is None:
        args.kl_warmup_steps = args.steps // KL_WARMUP_SHARE
    if not 0 <= args.kl_warmup_steps <= args.steps:
        parser.error(f"--kl-warmup-steps {args.kl_warmup_steps}: need an integer in 0..--steps ({args.steps})")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train = digits_images("train")[0].flatten(1)
    test = digits_images("test")[0].flatten(1)
    print(
        f"VAEs on 8x8 digits ({train.shape[0]} train / {test.shape[0]} test, 17 levels): {settings(args)}, "
        f"seeds={args.seeds}, torch threads={torch.get_num_threads()}, work={work_folder(args)}",
        flush=True,
    )
    results = []
    for seed in args.seeds:
        for name in args.configs:
            result = run_phase(name, seed, args, train, test)
            results.append(result)
            print(
                f"  seed {seed} {name:<15} test ELBO {result['test_elbo']:.2f}  IWAE-{args.k} "
                f"{result['test_iwae']:.2f}  ({result['train_s']:.0f} s train, {result['eval_s']:.0f} s eval)",
                flush=True,
            )
    summary = summarize(results, args.configs)
    print_table(results, summary, args.configs, args.k)
    payload = {
        "config": {
            "data": "digits_images train/test (seed 0, test fraction 0.2), flattened to 64 pixel counts 0..16",
            "n_train": train.shape[0],
            "n_test": test.shape[0],
            **settings(args),
            "seeds": list(args.seeds),
            "schedule": "cosine",
            "clip_norm": CLIP_NORM,
            "likelihood": "categorical (17 levels)",
            "train_bounds_rows": TRAIN_EVAL_ROWS,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "runs": results,
        "summary": summary,
    }
    write_results(RESULTS, payload)


if __name__ == "__main__":
    run_resumable(main)
