"""Task mixtures: each episode draws a family by weight and a configuration of it; meta-training on them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from module_tasks import small_cnn

from metaopt.config import ConfigError, ImageMLPTaskConfig, validate_config
from metaopt.meta import MetaTrainer, make_estimator
from metaopt.meta.unroll import rollout_losses
from metaopt.optimizers import make_optimizer
from metaopt.tasks import ModuleTask, Quadratic, TaskMixture, make_task, optimizee_seeds

QUADRATICS = [{"kind": "quadratic", "dim": 4}, {"kind": "quadratic", "dim": 7}]


def mixture_config(tasks, estimator="tbptt", **train):
    return validate_config(
        {
            "task": {"kind": "quadratic", "dim": 4},
            "optimizer": {"kind": "phnn", "options": {"normalize": True}},
            "train": {
                "tasks": tasks,
                "meta_steps": 6,
                "unroll": 2,
                "episode_length": 4,
                "batch_size": 4,
                "eval_every": 3,
                "eval_runs": 4,
                "checkpoint_every": 3,
                "estimator": {"kind": estimator, "pairs": 2},
                **train,
            },
            "device": "cpu",
        }
    )


def mixture(weights, stream=0):
    config = mixture_config([{"task": task, "weight": w} for task, w in zip(QUADRATICS, weights)])
    return TaskMixture([e.task for e in config.train.tasks], weights, "meta_train", stream=stream)


def test_episodes_draw_families_by_weight_and_each_stream_its_own():
    tasks = mixture([3, 1])
    dims = [tasks.episode_family(episode).dim for episode in range(400)]
    assert 0.68 < Counter(dims)[4] / 400 < 0.82
    assert dims == [mixture([3, 1]).episode_family(episode).dim for episode in range(400)]  # a pure function
    other = [mixture([3, 1], stream=1).episode_family(episode).dim for episode in range(400)]
    assert other != dims  # another Ray worker trains on other tasks
    assert len(tasks.built) == 2  # families whose data does not depend on the seed are built once


def test_a_sampled_configuration_is_a_function_of_the_task_seed_and_covers_the_choices():
    config = ImageMLPTaskConfig(image_size=[8, 28], hidden_sizes=[[16], [8, 8]], activation=["relu", "tanh"])
    choices = [config.choose(seed) for seed in range(64)]
    assert choices == [config.choose(seed) for seed in range(64)]
    assert {c["image_size"] for c in choices} == {8, 28}
    assert {tuple(c["hidden_sizes"]) for c in choices} == {(16,), (8, 8)}
    assert {c["activation"] for c in choices} == {"relu", "tanh"}


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_meta_training_on_a_mixture_of_shapes(tmp_path, estimator):
    tasks = [
        {"task": QUADRATICS[0]},
        {"task": QUADRATICS[1]},
        {"task": {"kind": "module", "factory": "module_tasks:small_cnn"}},
    ]
    trainer = MetaTrainer(mixture_config(tasks, estimator, meta_steps=16), tmp_path / "run")
    sizes = []
    trainer.train(show_progress=False, on_metrics=lambda step, m: sizes.append(trainer.estimator.family.num_params))
    assert len(set(sizes)) >= 2  # episodes of different shapes, each batched on its own
    assert all(torch.isfinite(torch.tensor(row["meta_loss"])) for row in trainer.history)
    assert trainer.history[-1]["heldout_loss"] < float("inf")


def test_resume_continues_a_mixture_exactly(tmp_path):
    tasks = [{"task": QUADRATICS[0]}, {"task": QUADRATICS[1]}]
    straight = MetaTrainer(mixture_config(tasks, "pes", meta_loss="relative"), tmp_path / "straight")
    straight.train(show_progress=False)
    interrupted = mixture_config(tasks, "pes", meta_steps=3, meta_loss="relative")
    MetaTrainer(interrupted, tmp_path / "interrupted").train(show_progress=False)
    resumed = MetaTrainer(mixture_config(tasks, "pes", meta_loss="relative"), tmp_path / "interrupted")
    resumed.resume(tmp_path / "interrupted")
    resumed.train(show_progress=False)
    for name, value in straight.meta_params.items():
        assert torch.equal(value, resumed.meta_params[name]), name


def test_parameter_rescaling_keeps_the_function_and_scales_each_tensor():
    seeds = optimizee_seeds(0, 3, "meta_train")
    plain, rescaled = ModuleTask(small_cnn(), 8), ModuleTask(small_cnn(), 8, parameter_scale=10.0)
    a, b = plain.sample(seeds), rescaled.sample(seeds)
    torch.testing.assert_close(rescaled.batched_loss(b.params, b, 0), plain.batched_loss(a.params, a, 0))
    ratios = a.params / b.params  # the factor of each tensor, repeated over its coordinates
    for chunk in b.data["scale"].split(rescaled.sizes, dim=1):
        assert torch.all(chunk == chunk[:, :1])
    finite = torch.isfinite(ratios) & (a.params != 0)
    torch.testing.assert_close(ratios[finite], b.data["scale"][finite])
    assert 0.1 <= float(b.data["scale"].min()) and float(b.data["scale"].max()) <= 10.0
    assert b.data["scale"].std() > 0.5


def test_a_wrong_mixture_entry_is_named():
    with pytest.raises(ConfigError, match=r"train\.tasks\[1\]\.task\.dim"):
        mixture_config([{"task": QUADRATICS[0]}, {"task": {"kind": "quadratic", "dim": 0}}])
    with pytest.raises(ConfigError, match=r"train\.tasks\[0\]\.weight"):
        mixture_config([{"task": QUADRATICS[0], "weight": 0}])
    assert isinstance(mixture([1, 1]).episode_family(0), Quadratic)


def sampled_families(mnist_root):
    data = {"root": mnist_root, "split": "test", "download": False}
    return [
        {
            "kind": "image_mlp",
            "image_size": [8, 28],
            "hidden_sizes": [[8], [8, 8]],
            "activation": ["relu", "gelu"],
            "data": data,
        },
        {"kind": "image_cnn", "image_size": [8, 12], "channels": [[4], [4, 8]], "data": data},
        {"kind": "markov_transformer", "d_model": [8, 16], "heads": [1, 2], "vocab": [6, 8], "length": [8]},
        {"kind": "char_lm", "context": [4, 8], "hidden": [16, 32]},
        {"kind": "teacher_student", "input_dim": [4, 8], "hidden_sizes": [[8], [8, 8]], "batch_size": [8, 32]},
    ]


def test_every_sampled_family_draws_its_configuration_from_the_task_seed(mnist_root):
    for family in sampled_families(mnist_root):
        config = validate_config({"task": {**family, "parameter_scale": 2.0}}).task
        tasks = [make_task(config, "meta_train", seed=seed) for seed in range(12)]
        assert all(isinstance(task, ModuleTask) and task.parameter_scale == 2.0 for task in tasks)
        assert len({task.num_params for task in tasks}) > 1, family["kind"]  # different configurations
        again = make_task(config, "meta_train", seed=5)
        assert again.parameter_shapes == tasks[5].parameter_shapes and again.batch_size == tasks[5].batch_size
        torch.testing.assert_close(again.inputs, tasks[5].inputs)


def test_meta_training_on_a_mixture_of_every_sampled_family(tmp_path, mnist_root):
    tasks = [{"task": family} for family in sampled_families(mnist_root)]
    trainer = MetaTrainer(mixture_config(tasks, meta_steps=10), tmp_path / "run")
    drawn = set()
    trainer.train(
        show_progress=False,
        on_metrics=lambda step, m: drawn.add(trainer.estimator.tasks.draw(trainer.estimator.episode)[0]),
    )
    assert len(drawn) >= 3  # (10 meta-steps of 2 truncations: 5 episodes)
    assert all(torch.isfinite(torch.tensor(row["meta_loss"])) for row in trainer.history)


@pytest.mark.parametrize("kind", ["tbptt", "pes"])
def test_a_relative_meta_loss_divides_each_optimizees_losses_by_its_initial_loss(kind):
    config = validate_config({"task": QUADRATICS[0], "train": {"estimator": {"kind": kind, "pairs": 2}}}).train
    family, optimizer = Quadratic(4), make_optimizer("phnn")
    seeds = optimizee_seeds(0, 1, "meta_train")

    def estimator(relative):
        return make_estimator(
            config.estimator,
            family,
            optimizer,
            lambda e: seeds,
            5,
            10,
            seed=3,
            meta_loss="relative" if relative else "loss",
        )

    meta_params = optimizer.init_meta_params(0)
    plain, relative = estimator(False).estimate(meta_params), estimator(True).estimate(meta_params)
    initial = float(family.batched_loss(family.sample(seeds).params, family.sample(seeds), 0)[0])
    assert relative.meta_loss == pytest.approx(plain.meta_loss / initial, rel=1e-5)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(relative.grads[name] * initial, grad, rtol=1e-4, atol=1e-6)


def test_validation_on_the_mixture_scores_relative_final_losses_on_meta_test_tasks(tmp_path):
    tasks = [{"task": QUADRATICS[0]}, {"task": QUADRATICS[1]}]
    trainer = MetaTrainer(mixture_config(tasks, validation="mixture", eval_tasks=4, meta_steps=3), tmp_path / "run")
    families = [family for family, _ in trainer.validation]
    assert len(families) == 4 and {family.dim for family in families} == {4, 7}
    meta_params = {k: v.detach() for k, v in trainer.meta_params.items()}
    expected = []
    for family, optimizees in trainer.validation:
        assert optimizees.seeds.remainder(2).eq(1).all()  # meta-test optimizees
        losses = rollout_losses(family, trainer.optimizer, meta_params, optimizees, 4)
        expected.append(float((losses[:, -1] / losses[:, 0]).mean()))
    assert trainer.heldout_loss() == pytest.approx(sum(expected) / 4, rel=1e-6)
    trainer.train(show_progress=False)
    assert 0 < trainer.best_heldout < 1
    with pytest.raises(ConfigError, match="validation: mixture needs a mixture"):
        validate_config({"task": QUADRATICS[0], "train": {"validation": "mixture"}})


def test_a_truncation_schedule_draws_each_episodes_length_and_stretches_the_step_schedule_over_it(tmp_path):
    tasks = [{"task": QUADRATICS[0]}, {"task": QUADRATICS[1]}]
    optimizer = {"kind": "phnn", "options": {"normalize": True, "horizon": 8}}
    config = mixture_config(tasks, "pes", episode_length=[4, 8], meta_steps=24, validation="mixture")
    config = validate_config({**config.model_dump(), "optimizer": optimizer})
    trainer = MetaTrainer(config, tmp_path / "run")
    seen = []  # (episode, its length, the step schedule's horizon, the step the truncation ended at)

    def record(step, metrics):
        estimator = trainer.estimator
        seen.append((estimator.episode, estimator.episode_length, estimator.optimizer.horizon, estimator.state.step))

    trainer.train(show_progress=False, on_metrics=record)
    assert {length for _, length, _, _ in seen} == {4, 8}
    assert all(horizon == length for _, length, horizon, _ in seen)
    ends = {episode: step for episode, _, _, step in seen}  # each episode's last truncation ends at its length
    assert all(ends[episode] == length for episode, length, _, _ in seen if episode < seen[-1][0])
    assert trainer.best_heldout < float("inf")  # validated over runs of the longest length

    straight = trainer.meta_params
    MetaTrainer(
        config.model_copy(update={"train": config.train.model_copy(update={"meta_steps": 11})}), tmp_path / "cut"
    ).train(show_progress=False)
    resumed = MetaTrainer(config, tmp_path / "cut")
    resumed.resume(tmp_path / "cut")
    resumed.train(show_progress=False)
    for name, value in straight.items():
        assert torch.equal(value, resumed.meta_params[name]), name


def test_a_truncation_schedule_must_fit_the_unroll_and_the_step_schedule():
    def train(episode_length, horizon):
        return validate_config(
            {
                "task": QUADRATICS[0],
                "optimizer": {"kind": "phnn", "options": {"horizon": horizon}},
                "train": {"unroll": 20, "episode_length": episode_length},
            }
        )

    assert train([100, 1000], 1000).train.episode_lengths == [100, 1000]
    with pytest.raises(ConfigError, match=r"horizon \(300\) must equal train\.episode_length \(\[100, 1000\]; one of"):
        train([100, 1000], 300)
    with pytest.raises(ConfigError, match=r"unroll \(20\) must not exceed episode_length \(10\)"):
        train([10, 100], 100)
    with pytest.raises(ConfigError, match="episode_length"):
        train([], 100)
