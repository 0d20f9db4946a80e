"""Meta-training: estimators, exact resume, non-finite skipping, checkpoints, and `metaopt train`."""

import math
import re
import shutil
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.benchmarks.common import off_initialisation
from metaopt.cli import main
from metaopt.config import validate_config
from metaopt.meta import CheckpointError, MetaTrainer, load_checkpoint, make_estimator, unroll
from metaopt.meta.checkpoint import load_trainer_state
from metaopt.optimizers import make_optimizer
from metaopt.tasks import Quadratic, optimizee_seeds


def train_config(kind="phnn", options=None, **train):
    return validate_config(
        {
            "task": {"kind": "quadratic"},
            "optimizer": {"kind": kind, "options": options or {}},
            "train": {
                "meta_steps": 6,
                "unroll": 5,
                "episode_length": 10,
                "batch_size": 8,
                "eval_every": 3,
                "eval_runs": 8,
                "checkpoint_every": 3,
                **train,
            },
            "evaluate": {"steps": 10, "runs": 6, "optimizers": [{"kind": "adam", "lr_sweep": [0.03, 0.1]}]},
            "device": "cpu",
        }
    )


def flat(params):
    return torch.cat([v.detach().reshape(-1) for v in params.values()])


def estimator(kind="tbptt", optimizer_kind="phnn", length=5, **options):
    family = Quadratic()
    config = validate_config({"task": {"kind": "quadratic"}, "train": {"estimator": {"kind": kind, **options}}}).train
    return make_estimator(
        config.estimator,
        family,
        make_optimizer(optimizer_kind),
        lambda episode: optimizee_seeds(0, 8, "meta_train", stream=episode),
        unroll_length=length,
        episode_length=20,
    )


@pytest.mark.parametrize("kind", ["hnn_seed", "lstm", "mlp", "phnn"])
def test_first_and_second_order_differ_only_through_the_gradients_dependence(kind):
    # Off the initialisation: lstm and hnn_seed start making no update.
    meta_params = off_initialisation(make_optimizer(kind).init_meta_params(0), 0, scale=0.1)
    # One step: the first gradient is taken at the detached starting point, so both agree exactly.
    one = [estimator(optimizer_kind=kind, length=1, second_order=s).estimate(meta_params).grads for s in (False, True)]
    torch.testing.assert_close(flat(one[0]), flat(one[1]))
    # Over several steps the second-order estimate also differentiates the gradients themselves.
    many = [estimator(optimizer_kind=kind, length=4, second_order=s).estimate(meta_params).grads for s in (False, True)]
    assert not torch.allclose(flat(many[0]), flat(many[1]))


def truncation_objective(meta_params, length=5):
    """The summed mean loss of one truncation as a plain number (what every estimator targets)."""
    fresh = estimator(length=length)
    losses, _ = unroll(fresh.family, fresh.optimizer.update, meta_params, fresh._state_for_step(), length)
    return float(losses.mean(1).sum())


def directional_derivative(meta_params, direction, eps=1e-3):
    norm = float(torch.linalg.vector_norm(flat(direction)))
    step = {k: eps * direction[k] / norm for k in meta_params}
    plus = truncation_objective({k: v + step[k] for k, v in meta_params.items()})
    minus = truncation_objective({k: v - step[k] for k, v in meta_params.items()})
    return (plus - minus) / (2 * eps), norm


def test_second_order_backprop_is_the_exact_gradient():
    meta_params = make_optimizer("phnn").init_meta_params(0)
    exact = estimator(length=5, second_order=True).estimate(meta_params).grads
    slope, norm = directional_derivative(meta_params, exact)
    assert slope == pytest.approx(norm, rel=2e-3)
    # First-order (detached gradients, the L2L/OPT-ML default) is a biased surrogate: here it is
    # not even a descent direction of the truncation's loss.
    first_order = estimator(length=5).estimate(meta_params).grads
    slope, norm = directional_derivative(meta_params, first_order)
    assert slope < 0.5 * norm


def test_es_agrees_with_the_exact_gradient_in_direction():
    meta_params = make_optimizer("phnn").init_meta_params(0)
    exact = flat(estimator(length=5, second_order=True).estimate(meta_params).grads)
    es = flat(estimator("es", length=5, pairs=256, sigma=0.001).estimate(meta_params).grads)
    cosine = float(torch.nn.functional.cosine_similarity(exact, es, dim=0))
    assert cosine > 0.5, cosine


def test_pes_accumulates_perturbations_within_an_episode_and_resets_after():
    pes = estimator("pes", length=5, pairs=4)
    meta_params = make_optimizer("phnn").init_meta_params(0)
    pes.estimate(meta_params)
    first = {k: v.clone() for k, v in pes.accumulated.items()}
    pes.estimate(meta_params)
    assert not torch.equal(flat(first), flat(pes.accumulated))  # summed over truncations
    for _ in range(3):  # episode_length 20 = 4 truncations of 5; the 5th starts a new episode
        pes.estimate(meta_params)
    assert pes.episode == 1 and pes.state.step == 5


@pytest.mark.parametrize("estimator_kind", ["tbptt", "pes"])
def test_resume_continues_exactly(tmp_path, estimator_kind):
    config = train_config(estimator={"kind": estimator_kind, "pairs": 2})
    straight = MetaTrainer(config, tmp_path / "straight")
    straight.train(show_progress=False)

    interrupted_config = train_config(meta_steps=3, estimator={"kind": estimator_kind, "pairs": 2})
    MetaTrainer(interrupted_config, tmp_path / "interrupted").train(show_progress=False)
    resumed = MetaTrainer(config, tmp_path / "interrupted")
    resumed.resume(tmp_path / "interrupted")
    assert resumed.meta_step == 3
    resumed.train(show_progress=False)
    for name, value in straight.meta_params.items():
        assert torch.equal(value, resumed.meta_params[name]), name
    assert [h["meta_loss"] for h in straight.history] == [h["meta_loss"] for h in resumed.history]


def test_resuming_a_finished_run_in_a_new_folder_returns_a_checkpoint_there(tmp_path):
    """What PBT does when it copies a finished trial's last checkpoint into another trial."""
    config = train_config(meta_steps=3)
    finished = MetaTrainer(config, tmp_path / "finished").train(show_progress=False)
    copy = MetaTrainer(config, tmp_path / "copy")
    copy.resume(finished)
    final = copy.train(show_progress=False)
    assert final.parent == tmp_path / "copy" / "checkpoints" and copy.meta_step == 3
    _, weights, _ = load_checkpoint(final)
    for name, value in copy.meta_params.items():
        assert torch.equal(weights[name], value), name


def test_same_seed_same_result_and_training_beats_initialisation(tmp_path):
    config = train_config(
        meta_steps=30,
        batch_size=32,
        episode_length=50,
        unroll=10,
        eval_every=30,
        eval_runs=32,
        meta_lr=0.01,
        estimator={"second_order": True},
    )
    runs = [MetaTrainer(config, tmp_path / f"run{i}") for i in range(2)]
    before = runs[0].heldout_loss()
    for run in runs:
        run.train(show_progress=False)
    assert torch.equal(flat(runs[0].meta_params), flat(runs[1].meta_params))
    after = runs[0].heldout_loss()
    assert after < 0.95 * before, (before, after)


def test_non_finite_meta_gradients_are_skipped_never_applied(tmp_path):
    # A step size of 30 makes every optimizee diverge to inf/NaN within the first truncation.
    trainer = MetaTrainer(train_config(options={"init_lr": 900.0}, meta_steps=2), tmp_path / "run")
    start = flat(trainer.meta_params).clone()
    metrics = trainer.meta_gradient_step()
    assert not math.isfinite(metrics["grad_norm"]) or not math.isfinite(metrics["meta_loss"])
    assert metrics["skipped_nonfinite"] == 1
    assert torch.equal(flat(trainer.meta_params), start)  # nothing applied
    assert trainer.estimator.state is None and trainer.estimator.episode == 1  # a fresh episode next


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    trainer = MetaTrainer(train_config(meta_steps=3), tmp_path / "run")
    checkpoint = trainer.train(show_progress=False)
    optimizer, meta_params, spec = load_checkpoint(checkpoint)
    assert spec["kind"] == "phnn" and spec["meta_step"] == 3 and "metaopt_version" in spec
    assert torch.equal(flat(meta_params), flat(trainer.meta_params))

    # A config for a different architecture refuses to resume from it.
    other = MetaTrainer(train_config(options={"hidden": 8}), tmp_path / "run")
    with pytest.raises(CheckpointError, match="holds phnn .* but the config trains phnn"):
        other.resume(tmp_path / "run")
    # A damaged weights file is reported as corrupt, naming the file.
    (checkpoint / "optimizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is corrupt: cannot read optimizer.safetensors"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="not a metaopt checkpoint"):
        load_checkpoint(tmp_path)


def flip_a_byte(file: Path) -> None:
    """Damage ``file`` as a disk can, where no format check sees it: one byte of tensor data flipped (the last
    byte of a safetensors file; one in the largest tensor record of torch.save's zip)."""
    data = bytearray(file.read_bytes())
    offset = len(data) - 1
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        name_and_extra = int.from_bytes(data[record.header_offset + 26 : record.header_offset + 28], "little")
        name_and_extra += int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")
        offset = record.header_offset + 30 + name_and_extra + record.file_size // 2
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_every_checkpoint_records_its_files_sha256_and_every_load_checks_it(tmp_path):
    checkpoint = MetaTrainer(train_config(meta_steps=1), tmp_path / "run").train(show_progress=False)
    for damaged, load in (
        ("optimizer.safetensors", load_checkpoint),
        ("trainer_state.pt", load_trainer_state),  # what MetaTrainer.resume reads
    ):
        copy = shutil.copytree(checkpoint, tmp_path / "copies" / damaged)
        load(copy)  # intact: loads
        flip_a_byte(copy / damaged)
        with pytest.raises(CheckpointError, match=f"{damaged} does not match its recorded SHA-256"):
            load(copy)


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_writes_only_into_its_run_or_the_output_it_names(tmp_path, capsys, monkeypatch):
    """A copy of a run's best checkpoint is no run: --resume refuses it before writing a byte, unless
    --output names where the continued run goes."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(meta_steps=3).model_dump(mode="json", exclude_none=True)))
    train = ["train", str(config), "--no-tracking", "--no-progress"]
    assert main([*train, "--output", str(tmp_path / "run")]) == 0
    copy = tmp_path / "copy" / "best"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "best", copy)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone else's")
    capsys.readouterr()
    before = files_under(tmp_path)
    for resume, output, error in (
        (copy, None, "not inside a metaopt run folder .* pass --output DIR"),
        (tmp_path / "copy", None, "not a metaopt run folder .* nor a checkpoint folder"),
        (copy, tmp_path / "taken", "--output .*taken already holds files"),
    ):
        assert main([*train, "--resume", str(resume), *(["--output", str(output)] if output else [])]) == 2
        assert re.search(error, capsys.readouterr().err)
        assert files_under(tmp_path) == before

    out = tmp_path / "continued"
    step = load_checkpoint(copy)[2]["meta_step"]
    assert main([*train, "--resume", str(copy), "--output", str(out), "--set", "train.meta_steps=5"]) == 0
    assert f"resuming {copy} at meta-step {step}, writing to {out}" in capsys.readouterr().out
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("continued/")} == before
    assert load_checkpoint(out / "checkpoints" / "meta_step_000005")[2]["meta_step"] == 5
    assert (out / "checkpoints" / "best").is_dir() and (out / "evaluation").is_dir()

    # A run's own checkpoint continues in that run, as before.
    assert main([*train, "--resume", str(tmp_path / "run" / "checkpoints" / "meta_step_000003")]) == 0
    assert f"writing to {tmp_path / 'run'}" in capsys.readouterr().out


def test_only_complete_checkpoints_are_kept(tmp_path):
    trainer = MetaTrainer(train_config(meta_steps=9, checkpoint_every=1, keep_checkpoints=2), tmp_path / "run")
    trainer.train(show_progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best", "meta_step_000008", "meta_step_000009"]  # no .partial-* left behind


def test_train_cli_end_to_end_and_evaluate_accepts_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default ./mlflow.db and ./mlruns land here, not in the checkout
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config().model_dump(mode="json", exclude_none=True)))
    run = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for row in ("| phnn |", "| phnn (untrained) |", "| adam |"):
        assert row in out
    assert (run / "evaluation" / "summary.parquet").exists() and (run / "metrics.parquet").exists()

    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(
        yaml.safe_dump(
            {
                "task": {"kind": "quadratic"},
                "evaluate": {
                    "steps": 10,
                    "runs": 4,
                    "optimizers": [{"checkpoint": str(checkpoint), "name": "trained"}, {"kind": "adam", "lr": 0.1}],
                },
            }
        )
    )
    assert main(["evaluate", str(evaluate), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert "| trained |" in capsys.readouterr().out

    # --resume of a finished run is a no-op on training that still reports.
    assert main(["train", str(config), "--resume", str(run), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out


def test_train_cli_stretches_a_learned_schedule_over_the_evaluation(tmp_path, monkeypatch):
    """Trained on 10-step episodes (horizon 10), evaluated over 20 steps: unstretched, the schedule's
    last knot (0) would stop every run at step 10."""
    monkeypatch.chdir(tmp_path)
    config = train_config(options={"horizon": 10, "init_lr": 0.01}, meta_steps=1)
    config.evaluate.steps = 20
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    assert main(["train", str(path), "--output", str(tmp_path / "run"), "--no-progress", "--no-tracking"]) == 0
    curves = pq.read_table(tmp_path / "run" / "evaluation" / "curves.parquet").to_pandas()
    untrained = curves[curves.optimizer == "phnn (untrained)"].groupby("step").loss.mean()
    assert untrained[20] < 0.9 * untrained[10]


def test_best_checkpoint_tracks_the_lowest_validation_loss(tmp_path):
    trainer = MetaTrainer(train_config(meta_steps=6, eval_every=2, estimator={"second_order": True}), tmp_path / "run")
    trainer.train(show_progress=False)
    initial = MetaTrainer(train_config(), tmp_path / "other").heldout_loss()
    scored = [initial] + [h["heldout_loss"] for h in trainer.history if "heldout_loss" in h]
    _, best_params, spec = load_checkpoint(trainer.best_checkpoint)
    assert trainer.best_heldout == min(scored)
    assert spec["meta_step"] == 2 * scored.index(min(scored))
    assert "best" not in [p.name for p in trainer.checkpoint_dir.iterdir() if p.name.startswith("meta_step_")]
