"""Profile optimizers' steps on one task of a benchmark suite: per step, the loss, the RMS of the update
over every coordinate and the norm of the parameters, mean over the suite's runs (real ``nn.Module``s on
the benchmark's minibatches, as ``metaopt benchmark`` runs them).

    python -m jobs.profile_steps jobs/configs/suite_heldout.yaml iris_logistic \\
        --optimizer pretrained:general --baseline adam:0.3:constant [--output runs/profile/iris_logistic.parquet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from pydantic import ValidationError

from jobs.benchmarks.common import markdown_table
from metaopt.api import load_optimizer
from metaopt.benchmark import (
    BASELINE_KINDS,
    Baseline,
    BaselineGrid,
    load_suite,
    resolve_learned,
    torch_optimizer,
    train_modules,
)
from metaopt.config import ConfigError
from metaopt.tasks import make_task, optimizee_seeds

REPORTED_STEPS = (0, 9, 49, 99, 199, 299, 999)
COLUMNS = [
    ("optimizer", "optimizer", ""),
    ("step", "step", "d"),
    ("loss", "loss", ".4g"),
    ("update_rms", "update RMS", ".3g"),
    ("norm", "parameter norm", ".4g"),
]


def profile(task, seeds, steps: int, make_optimizer) -> pd.DataFrame:
    """Per run and step: the loss before the step, the update's RMS and the parameters' norm after it.
    ``make_optimizer(params)`` returns the optimizer and an optional learning-rate scheduler."""
    rows, schedulers = [], []

    def build(params):
        optimizer, scheduler = make_optimizer(params)
        schedulers[:] = [scheduler] if scheduler else []
        return optimizer

    def probe(run, step, before, model):
        after = list(model.parameters())
        update = torch.cat([(a.detach() - b).reshape(-1) for a, b in zip(after, before)])
        norm = torch.cat([a.detach().reshape(-1) for a in after]).norm()
        rows.append({"run": run, "step": step, "update_rms": float(update.square().mean().sqrt()), "norm": float(norm)})
        for scheduler in schedulers:
            scheduler.step()

    losses = train_modules(task, seeds, steps, build, probe=probe)
    frame = pd.DataFrame(rows)
    frame["loss"] = [float(losses[run, step]) for run, step in zip(frame["run"], frame["step"])]
    return frame


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", help="suite YAML, e.g. jobs/configs/suite_heldout.yaml")
    parser.add_argument("task", help="a task name of the suite, e.g. iris_logistic")
    parser.add_argument("--optimizer", action="append", default=[], help="a learned optimizer source (repeatable)")
    parser.add_argument(
        "--baseline", action="append", default=[], help="KIND:LR:SCHEDULE, e.g. adam:0.3:constant (repeatable)"
    )
    parser.add_argument("--output", help="Parquet file of every run's steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    suite = load_suite(args.suite)
    entry = next((entry for entry in suite.tasks if entry.name == args.task), None)
    if entry is None:
        parser.error(f"{args.task!r} is not a task of {args.suite}: {', '.join(e.name for e in suite.tasks)}")
    task = make_task(entry.task, "meta_test")
    seeds = optimizee_seeds(suite.seed, suite.runs, "meta_test")

    makers = {}
    for source in args.optimizer:
        try:
            learned = resolve_learned(source)
        except ConfigError as error:
            parser.error(str(error))
        options = {"horizon": entry.steps} if learned.has_schedule else {}
        makers[learned.name] = lambda params, learned=learned, options=options: (
            load_optimizer(learned.folder, params, **options),
            None,
        )
    for text in args.baseline:
        kind, lr, schedule = (text.split(":") + ["", "", ""])[:3]
        try:
            BaselineGrid(kinds=[kind], lrs=[lr], schedules=[schedule])
        except ValidationError:
            parser.error(
                f"--baseline {text!r}: expected KIND:LR:SCHEDULE with KIND one of {', '.join(BASELINE_KINDS)}, "
                "LR > 0 and SCHEDULE constant or cosine, e.g. adam:0.3:constant"
            )
        baseline = Baseline(kind, float(lr), schedule)

        def make(params, baseline=baseline):
            optimizer = torch_optimizer(baseline, params, suite.baselines)
            cosine = baseline.schedule == "cosine"
            return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, entry.steps) if cosine else None

        makers[baseline.name] = make

    frames = [profile(task, seeds, entry.steps, make).assign(optimizer=name) for name, make in makers.items()]
    steps = pd.concat(frames, ignore_index=True)
    shown = steps[steps["step"].isin(REPORTED_STEPS)].groupby(["optimizer", "step"])[["loss", "update_rms", "norm"]]
    print(f"{args.task}: mean over {suite.runs} runs (loss before the step; update RMS and norm after it)\n")
    print(markdown_table(shown.mean().reset_index().to_dict("records"), COLUMNS))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        steps.to_parquet(args.output)
        print(f"\nwrote {args.output}")
    return steps


if __name__ == "__main__":
    main()
