"""Benchmark: class-conditional flow matching on the 8x8 digits, every few-step family, and a Glow.

What it measures
----------------
The data are scikit-learn's 8x8 digits as images through the runs layer (``[data] name =
"digits-images"``, ``conditional = true``): 1,438 training and 359 test images, pixel counts 0..16,
each image's class as a one-hot context. Every flow-matching model sees the counts dequantized
afresh in every batch and scaled to [-1, 1) (``flowforge.runs.data``, ``y = 2 (k + u) / 17 - 1``);
its samples go back to counts by ``floor(17 (y + 1) / 2)``, clamped to 0..16.

Five models share one network and one training budget: a :class:`~flowforge.nn.UNetVelocity`
(``--channels`` 32 base channels, resolutions 8x8 and 4x4, one residual block per resolution,
GroupNorm with 8 groups, a 64-wide sinusoidal time embedding; 0.64M parameters, plus a step
embedding for shortcut and MeanFlow) trained for ``--steps`` (1,200) Adam steps of batch
``--batch`` (128) by the runs layer's Trainer (lr 1e-3, 60 warm-up steps, cosine decay to 0,
gradient clipping at 10), exact minibatch-OT coupling, ``context_dropout`` 0.1:

1. ``fm``: conditional flow matching (``flow-matching``);
2. ``shortcut``: a shortcut model (``max_halvings`` ``--shortcut-halvings`` 3, a
   ``--shortcut-fraction`` 0.5 self-consistency share; see ``flow_matching_few_step.py`` for why
   few levels and a large share help few-step samples);
3. ``meanflow``: MeanFlow (span share 0.25, adaptive weight p = 1: the library's defaults);
4. ``ct``: consistency training (the improved recipe's defaults; the curriculum spans the run);
5. ``cd``: consistency distillation from ``fm`` (Heun steps of its ODE on an 18-interval grid),
   the same steps and batch, starting from a copy of ``fm``'s U-Net
   (``ConsistencyMatcher.distilled_from``: the teacher's one-step Euler map).

Each draws one sample per training image, with that image's class (1,438 samples, the class counts
of the training split), at NFE 1, 2 and 10: Euler steps for ``fm`` (and 5 midpoint steps, also
NFE 10), Euler with the step told to the network for ``shortcut`` (NFE 10 is not a trained step,
so it uses the instantaneous field) and ``meanflow``, multistep consistency sampling for ``ct``
and ``cd``; eagerly (``trace_fixed_steps = False``: tracing the unrolled U-Net solve for one call
costs several times the solve). A digits classifier of flowforge's own (``train_digits_classifier``
with its defaults, trained on the training split, cached in the work folder) scores them:

* ``fd``: the Fréchet distance between its penultimate features of the samples and of the 359 test
  images. The floor at these sample sizes is the training split against the test split
  (``reference``: real digits, 1,438 against 359), reported with the classifier's test accuracy;
* ``accuracy``: the share of samples it labels with the class they were drawn for.

Next to them, flowforge's Glow (``configs/glow_digits.toml``: 2 levels of 4 steps, 64 hidden
channels, variational dequantization; ``--glow-steps`` 600 steps of batch 64, 16 s of CPU),
unconditional, 1,438 samples at temperature 1 scored by the same classifier (``fd`` only).

Goal checks: ``fm``'s conditional accuracy at NFE 10 (its better NFE-10 sampler by ``fd``) at
least 95 %; some few-step family at NFE 1 or 2 within 10 % of that NFE-10 ``fd``.

Results (seed 0, defaults; FD floor 14.77, classifier test accuracy 99.4 %): ``fm`` reaches FD
16.3 at NFE 10 (midpoint; Euler 16.5) with 98-99 % accuracy, 24.4 at NFE 2 and 56.7 at NFE 1.
MeanFlow at NFE 2 (16.3, 95.9 %) and the shortcut model at NFE 2 (17.4, 97.8 %) match flow
matching's NFE 10. At NFE 1 consistency distillation is best: 19.1 (96.3 %), its student
starting from a copy of ``fm``'s U-Net, then 21.1 and 23.1 at NFE 2 and 10 (from a fresh U-Net it
gave 37.9, 43.7 and 61.5); the shortcut model gives 22.5 at NFE 1; consistency training from scratch does not
learn at this budget (FD about 250, accuracy 16-24 %; a shorter curriculum, 10 to 80
intervals, did not help either: FD 275-308); the improved recipe is published with hundreds of
thousands of training steps. The Glow, unconditional and at temperature 1, scores FD 237: its
samples are noisy digits.

Resumable: every trained model is a run folder under ``--work`` (checkpoints every 200 steps; an
interrupted training resumes), every set of samples and every measurement a file there; a phase
whose file exists is skipped (nothing locks a phase: run one invocation per work folder at a time,
and delete a phase's files after changing the code it measures). Results:
``benchmarks/results/flow_matching_digits.json``; one PNG per model,
``benchmarks/results/flow_matching_digits_<model>.png``, a row per class with 4 samples at NFE 1,
2 and 10 side by side (the Glow's rows: the class the classifier reads).

How to run
----------
::

    OMP_NUM_THREADS=1 python benchmarks/flow_matching_digits.py --work benchmark-work/fm-digits
    python benchmarks/flow_matching_digits.py --steps 100 --glow-steps 50 --work /tmp/quick   # a quick look

With the defaults the whole benchmark takes about 21 minutes of one core (1 torch thread; the JSON's
``phases_cpu_s``: 1,223 s of training and sampling measured as CPU time, plus about 15 s for the
classifier), 97 % of it training: flow matching 163 s, shortcut 217 s, MeanFlow 340 s (a
Jacobian-vector product per step), consistency training 186 s, distillation 265-322 s, Glow 16 s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from common import (
    RESULTS_DIR,
    changed_settings,
    parameter_count,
    positive_float,
    positive_int,
    read_json,
    refuse_other_settings,
    run_resumable,
    seed_int,
    write_json,
    write_results,
)
from flowforge import runs
from flowforge.data import digits_images
from flowforge.eval.image_quality import conditional_accuracy, frechet_classifier_distance
from flowforge.eval.plots import plot_class_grid
from flowforge.matching import ConsistencyMatcher, FlowMatcher
from flowforge.runs.data import one_hot
from flowforge.train import Objective, Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parent
RESULTS = RESULTS_DIR / "flow_matching_digits.json"
LEVELS = 17
CLASSES = 10
#: model -> registered kind (cd: a consistency model trained by distillation from fm).
MODELS = {
    "fm": "flow-matching",
    "shortcut": "shortcut",
    "meanflow": "meanflow",
    "ct": "consistency",
    "cd": "consistency",
}
#: model -> the samplers measured: (name, steps, method); NFE = steps x stages.
SETTINGS = {
    "fm": [("euler-1", 1, "euler"), ("euler-2", 2, "euler"), ("euler-10", 10, "euler"), ("midpoint-5", 5, "midpoint")],
    **{m: [(f"steps-{k}", k, "euler") for k in (1, 2, 10)] for m in ("shortcut", "meanflow", "ct", "cd")},
}
FEW_STEP = ("shortcut", "meanflow", "ct", "cd")
ACCURACY_GOAL = 0.95
FD_TOLERANCE = 0.10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/flow-matching-digits"), help="cache folder")
    parser.add_argument("--steps", type=positive_int, default=1200, help="training steps of every model (default 1200)")
    parser.add_argument("--batch", type=positive_int, default=128, help="batch size (default 128)")
    parser.add_argument("--channels", type=positive_int, default=32, help="U-Net base channels (default 32)")
    parser.add_argument("--shortcut-halvings", type=positive_int, default=3, help="shortcut max_halvings (default 3)")
    parser.add_argument("--shortcut-fraction", type=positive_float, default=0.5, help="shortcut self-consistency share")
    parser.add_argument(
        "--ct-intervals",
        type=positive_int,
        nargs=2,
        default=[10, 1280],
        metavar=("INITIAL", "FINAL"),
        help="consistency training's curriculum: first and last number of intervals (default 10 1280)",
    )
    parser.add_argument("--glow-steps", type=positive_int, default=600, help="Glow training steps (default 600)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--seed", type=seed_int, default=0, help="training and sampling seed (default 0)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- training
def run_config(name: str, args: argparse.Namespace) -> runs.RunConfig:
    options = {
        "velocity": "unet",
        "channels": args.channels,
        "channel_multipliers": [1, 2],
        "context_dropout": 0.1,
        "coupling": "ot",
    }
    if name == "shortcut":
        options |= {"max_halvings": args.shortcut_halvings, "self_consistency_fraction": args.shortcut_fraction}
    if name == "ct":
        options |= {"initial_intervals": args.ct_intervals[0], "final_intervals": args.ct_intervals[1]}
    return runs.RunConfig(
        model=runs.ModelConfig(kind=MODELS[name], options=options),
        data=runs.DataConfig(name="digits-images", conditional=True),
        train=TrainerConfig(
            steps=args.steps,
            batch_size=args.batch,
            lr=1e-3,
            warmup_steps=min(60, args.steps - 1),
            checkpoint_every=200,
            seed=args.seed,
            log_every=50,
            progress=False,
        ),
    )


class Distillation(Objective):
    """Consistency distillation from a trained flow matcher, on freshly dequantized counts."""

    def __init__(self, teacher: FlowMatcher) -> None:
        self.teacher = teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    def loss(self, model: nn.Module, batch) -> Tensor:
        x, context = batch
        return model.distillation_loss(runs.counts_to_model_units(x, LEVELS), self.teacher, context)


def _trained(folder: Path, config: runs.RunConfig) -> tuple[runs.Run, dict] | None:
    """The finished run in ``folder`` and its record, when there is one; refused (the script stops)
    when it was trained under another config than ``config``: its figures would be reported under
    settings it was not trained with."""
    info = read_json(folder / "trained.json")
    if not isinstance(info, dict):
        return None
    run = runs.load_run(folder)
    changed = changed_settings(asdict(run.config), asdict(config))
    refuse_other_settings(folder, changed, "give another --work to train again (its scores are kept beside the models)")
    return run, info


def train_model(name: str, args: argparse.Namespace, trained: dict[str, runs.Run]) -> tuple[runs.Run, dict]:
    """Train ``name`` into ``<work>/models/<name>`` (resuming a checkpoint), or load it when done."""
    folder = args.work / "models" / name
    config = run_config(name, args)
    done = _trained(folder, config)
    if done is not None:
        return done
    print(f"training {name} ({MODELS[name]}) for {args.steps} steps", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    if name == "cd":
        data = runs.load_data(config.data)
        torch.manual_seed(config.train.seed)
        model = runs.build_model(config, data)  # built from the config, so that the run reloads
        # the student starts as the teacher's one-step Euler map (its velocity network's weights)
        model.load_state_dict(ConsistencyMatcher.distilled_from(trained["fm"].model).state_dict())
        trainer = Trainer(
            model,
            Distillation(trained["fm"].model),
            config.train,
            data=data.train,
            context=data.train_context,
            directory=folder,
            metadata={"run": asdict(config), "standardizer": None},
        )
        trainer.fit(resume=True)
        run = runs.load_run(folder)
    else:
        prepared = runs.prepare_run(config, folder, name)
        run = runs.train_run(prepared, resume=True)
    info = {
        "train_s": time.perf_counter() - start,
        "train_cpu_s": time.process_time() - cpu,
        "parameters": parameter_count(run.model),
        "kind": MODELS[name],
    }
    write_json(folder / "trained.json", info)
    print(f"  {name}: {info['parameters']:,} parameters, {info['train_cpu_s']:.0f} s CPU", flush=True)
    return run, info


def train_glow(args: argparse.Namespace) -> tuple[runs.Run, dict]:
    folder = args.work / "models" / "glow"
    overrides = [f"train.steps={args.glow_steps}", "train.progress=false", "train.checkpoint_every=200"]
    overrides.append(f"train.warmup_steps={min(50, args.glow_steps - 1)}")
    config = runs.load_config(ROOT.parent / "configs" / "glow_digits.toml", overrides)
    done = _trained(folder, config)
    if done is not None:
        return done
    print(f"training glow for {args.glow_steps} steps", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    run = runs.train_run(runs.prepare_run(config, folder, "glow"), resume=True)
    info = {
        "train_s": time.perf_counter() - start,
        "train_cpu_s": time.process_time() - cpu,
        "parameters": parameter_count(run.model),
        "kind": "glow",
    }
    write_json(folder / "trained.json", info)
    print(f"  glow: {info['parameters']:,} parameters, {info['train_cpu_s']:.0f} s CPU", flush=True)
    return run, info


# ---------------------------------------------------------------- sampling and scoring
@torch.no_grad()
def draw(
    run: runs.Run, name: str, setting: tuple[str, int, str], labels: Tensor, args: argparse.Namespace, index: int
) -> dict:
    """Samples of ``name`` with ``setting`` for ``labels`` (cached), with their NFE and wall time."""
    key, steps, method = setting
    path = args.work / "samples" / f"{name}-{key}.pt"
    if path.is_file():
        return torch.load(path)
    torch.manual_seed(args.seed + 1000 + index)
    model = run.model
    model.trace_fixed_steps = False  # one call per setting: a TorchScript trace of a U-Net solve never pays off
    start, cpu = time.perf_counter(), time.process_time()
    y = model.sample(1, one_hot(labels, CLASSES), steps=steps, method=method)[0]
    result = {
        "counts": runs.model_units_to_counts(y, LEVELS).to(torch.uint8),
        "nfe": int(model.last_nfe),
        "sample_s": time.perf_counter() - start,
        "sample_cpu_s": time.process_time() - cpu,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def score(key: str, classifier, samples: Tensor, reference: Tensor, labels: Tensor | None, work: Path) -> dict:
    path = work / "metrics" / f"{key}.json"
    stored = read_json(path)  # None when missing or cut short: scored again
    if isinstance(stored, dict):
        return stored
    samples = samples.float()
    metrics = {"fd": frechet_classifier_distance(classifier, samples, reference)}
    if labels is not None:
        metrics["accuracy"] = conditional_accuracy(classifier, samples, labels)
    write_json(path, metrics)
    return metrics


def grid(name: str, panels: list[Tensor], labels: Tensor, title: str, per: int = 4) -> Path:
    """One PNG: a row per class, ``per`` samples of each panel side by side."""
    rows = []
    for k in range(CLASSES):
        rows.append(torch.cat([panel[labels == k][:per] for panel in panels]).float())
    path = RESULTS.parent / f"flow_matching_digits_{name}.png"
    return plot_class_grid(rows, None, path, columns=per * len(panels), value_range=(0, LEVELS - 1), title=title)


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    begin, begin_cpu = time.perf_counter(), time.process_time()
    data_config = runs.DataConfig(name="digits-images", conditional=True)
    train_x, train_y = digits_images("train", data_config.test_fraction, data_config.seed)
    test_x, _ = digits_images("test", data_config.test_fraction, data_config.seed)
    print(
        f"class-conditional digits ({train_x.shape[0]} train / {test_x.shape[0]} test): "
        f"U-Net {args.channels} channels, "
        f"{args.steps} steps of batch {args.batch}, models {', '.join(args.models)}; torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    classifier, classifier_accuracy = runs.digits_classifier(data_config, cache=args.work)
    reference = score("reference-train-vs-test", classifier, train_x, test_x, None, args.work)
    print(f"classifier test accuracy {classifier_accuracy:.4f}; reference FD (train vs test) {reference['fd']:.3f}")

    rows: list[dict] = []
    models: dict[str, dict] = {}
    trained: dict[str, runs.Run] = {}
    order = [m for m in MODELS if m in args.models]
    if "cd" in order and "fm" not in order:
        order.insert(0, "fm")  # the teacher
    for name in order:
        run, info = train_model(name, args, trained)
        trained[name] = run
        models[name] = info
        panels = []
        for index, setting in enumerate(SETTINGS[name]):
            drawn = draw(run, name, setting, train_y, args, index)
            metrics = score(f"{name}-{setting[0]}", classifier, drawn["counts"], test_x, train_y, args.work)
            row = {
                "model": name,
                "setting": setting[0],
                "nfe": drawn["nfe"],
                "sample_s": drawn["sample_s"],
                "sample_cpu_s": drawn["sample_cpu_s"],
                **metrics,
            }
            rows.append(row)
            if setting[0] != "midpoint-5":
                panels.append(drawn["counts"])
            print(
                f"  {name:<9} {setting[0]:<11} NFE {row['nfe']:>2}  FD {row['fd']:8.3f}  accuracy "
                f"{row['accuracy']:.4f}  ({row['sample_cpu_s']:.1f} s CPU)",
                flush=True,
            )
        grid(name, panels, train_y, f"{name}: NFE 1 | 2 | 10")

    glow, info = train_glow(args)
    models["glow"] = info
    path = args.work / "samples" / "glow.pt"
    if path.is_file():
        glow_samples = torch.load(path)
    else:
        torch.manual_seed(args.seed + 2000)
        start, cpu = time.perf_counter(), time.process_time()
        glow_samples = {"counts": runs.draw_samples(glow, train_x.shape[0]).to(torch.uint8)}
        glow_samples["sample_s"] = time.perf_counter() - start
        glow_samples["sample_cpu_s"] = time.process_time() - cpu
        torch.save(glow_samples, path)
    metrics = score("glow", classifier, glow_samples["counts"], test_x, None, args.work)
    rows.append(
        {
            "model": "glow",
            "setting": "temperature-1",
            "nfe": 1,
            "sample_s": glow_samples["sample_s"],
            "sample_cpu_s": glow_samples["sample_cpu_s"],
            **metrics,
        }
    )
    predicted = classifier.predict(glow_samples["counts"].float())
    grid("glow", [glow_samples["counts"]], predicted, "glow: rows by classifier label", per=10)
    print(f"  glow      temperature-1 FD {metrics['fd']:8.3f}", flush=True)

    summary = summarize(rows)
    print_table(rows, reference["fd"], classifier_accuracy, models, summary)
    payload = {
        "config": {
            "data": "digits_images, class-conditional (one-hot context), dequantized to [-1, 1)",
            "n_train": train_x.shape[0],
            "n_test": test_x.shape[0],
            "samples_per_setting": train_x.shape[0],
            "unet": {"channels": args.channels, "channel_multipliers": [1, 2], "blocks": 1, "time_embedding": 64},
            "steps": args.steps,
            "batch": args.batch,
            "lr": 1e-3,
            "context_dropout": 0.1,
            "coupling": "exact-ot",
            "shortcut": {"max_halvings": args.shortcut_halvings, "self_consistency_fraction": args.shortcut_fraction},
            "ct_intervals": list(args.ct_intervals),
            "glow": {"config": "configs/glow_digits.toml", "steps": args.glow_steps},
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "classifier_test_accuracy": classifier_accuracy,
        "reference_fd_train_vs_test": reference["fd"],
        "models": models,
        "results": rows,
        "summary": summary,
        # Every phase's own CPU time, summed over the invocations that ran it (phases resume from files).
        "phases_cpu_s": sum(i["train_cpu_s"] for i in models.values()) + sum(r["sample_cpu_s"] for r in rows),
        "seconds_this_invocation": time.perf_counter() - begin,
        "cpu_seconds_this_invocation": time.process_time() - begin_cpu,
    }
    write_results(RESULTS, payload)


def summarize(rows: list[dict]) -> dict:
    fm10 = [r for r in rows if r["model"] == "fm" and r["nfe"] == 10]
    if not fm10:
        return {}
    best = min(fm10, key=lambda r: r["fd"])
    few = [r for r in rows if r["model"] in FEW_STEP and r["nfe"] <= 2]
    best_few = min(few, key=lambda r: r["fd"]) if few else None
    summary = {
        "fm_nfe10": {"setting": best["setting"], "fd": best["fd"], "accuracy": best["accuracy"]},
        "goal_fm_accuracy": {
            "value": best["accuracy"],
            "target": ACCURACY_GOAL,
            "pass": best["accuracy"] >= ACCURACY_GOAL,
        },
    }
    if best_few is not None:
        ratio = best_few["fd"] / best["fd"]
        summary["goal_few_step_fd"] = {
            "model": best_few["model"],
            "setting": best_few["setting"],
            "nfe": best_few["nfe"],
            "fd": best_few["fd"],
            "ratio_to_fm_nfe10": ratio,
            "pass": ratio <= 1 + FD_TOLERANCE,
        }
    return summary


def print_table(rows: list[dict], reference_fd: float, accuracy: float, models: dict, summary: dict) -> None:
    print(
        f"\nreference: real training digits vs test digits FD {reference_fd:.3f}; "
        f"classifier test accuracy {accuracy:.4f}"
    )
    print(f"{'model':<9} {'setting':<14} {'NFE':>3}  {'FD':>8}  {'FD/ref':>6}  {'accuracy':>8}  {'sample CPU s':>12}")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        print(
            f"{r['model']:<9} {r['setting']:<14} {r['nfe']:>3}  {r['fd']:>8.3f}  {r['fd'] / reference_fd:>6.2f}  "
            f"{acc:>8}  {r['sample_cpu_s']:>12.2f}"
        )
    print(
        "\ntraining CPU time: "
        + ", ".join(f"{m} {i['train_cpu_s']:.0f} s ({i['parameters']:,} params)" for m, i in models.items())
    )
    if "goal_fm_accuracy" in summary:
        g = summary["goal_fm_accuracy"]
        fm = summary["fm_nfe10"]
        print(
            f"goal fm conditional accuracy >= {ACCURACY_GOAL:.0%} at NFE 10 ({fm['setting']}): {g['value']:.4f} -> "
            f"{'PASS' if g['pass'] else 'FAIL'}"
        )
    if "goal_few_step_fd" in summary:
        g = summary["goal_few_step_fd"]
        print(
            f"goal a few-step family at NFE 1-2 within {FD_TOLERANCE:.0%} of fm's NFE-10 FD "
            f"({summary['fm_nfe10']['fd']:.3f}): best {g['model']} {g['setting']} FD {g['fd']:.3f} "
            f"(x{g['ratio_to_fm_nfe10']:.2f}) -> {'PASS' if g['pass'] else 'FAIL'}"
        )


if __name__ == "__main__":
    run_resumable(main)
