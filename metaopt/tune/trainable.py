"""One Tune trial = one meta-training run (in-process, or with its own RolloutWorker actors)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from ray import tune

from metaopt.meta import MetaTrainer
from metaopt.pipeline import gradient_source
from metaopt.tune.space import METRIC, SearchSpace

REPORTED = ("meta_loss", "grad_norm", "optimizee_steps_per_s", "skipped_nonfinite")


def meta_train_trial(sample: dict[str, Any], space: SearchSpace) -> None:
    """Meta-train the trial's config; every validation is reported to Tune with its checkpoint, and a
    restarted trial (resumed search, PBT exploit) continues from ``tune.get_checkpoint()``."""
    torch.set_num_threads(max(1, int(space.spec.search.trial_cpus)))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint in the driver's log
    config = space.trial_config(sample)
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    # Scratch space: a restarted trial (resumed search, PBT exploit) continues from Tune's checkpoint,
    # and checkpoints a killed run left here past it would be pruned in favour of the new ones.
    shutil.rmtree(run_dir, ignore_errors=True)
    with gradient_source(config) as workers:
        trainer = MetaTrainer(config, run_dir, gradient_source=workers)
        if checkpoint := tune.get_checkpoint():
            with checkpoint.as_directory() as folder:
                trainer.resume(Path(folder))

        def report(folder: Path, metrics: dict[str, float]) -> None:
            tune.report(
                {
                    METRIC: metrics[METRIC],
                    "meta_step": trainer.meta_step,
                    **{k: metrics[k] for k in REPORTED if k in metrics},
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

        # PBT may hand this trial a finished trial's last checkpoint: nothing is left to train, but the
        # trial must still report its end itself, or its last result stays the donor's (its trial id too)
        finished = trainer.meta_step >= config.train.meta_steps
        final = trainer.train(show_progress=False, on_checkpoint=report)
        if finished:
            report(final, {METRIC: trainer.heldout_loss()})
