"""Optimizees from any torch.nn.Module: torch.func batches the module's own forward over optimizees."""

from __future__ import annotations

import pytest
import torch
from module_tasks import small_cnn

from metaopt.config import ConfigError, validate_config
from metaopt.meta import MetaTrainer
from metaopt.tasks import ModuleTask, make_task, optimizee_seeds


def test_the_batched_loss_is_each_modules_own_forward():
    task = ModuleTask(small_cnn(), batch_size=16)
    optimizees = task.sample([3, 5, 7])
    batched = task.batched_loss(optimizees.params, optimizees, step=2)
    batch = task.batch(optimizees, step=2)
    for i, seed in enumerate([3, 5, 7]):
        torch.manual_seed(seed)  # the seed's own initialisation, drawn as ModuleTask draws it
        model = task.definition.model()
        torch.testing.assert_close(batched[i], task.definition.loss(model(batch["x"][i]), batch["y"][i]))
    assert list(task.parameter_shapes) == [name for name, _ in task.template.named_parameters()]
    assert task.parameter_shapes["6.weight"] == (10, 64) and task.num_params == optimizees.params.shape[1]


def test_a_seed_reproduces_its_initialisation_and_minibatches():
    task = ModuleTask(small_cnn(), batch_size=8)
    first, again, other = task.sample([11]), task.sample([11]), task.sample([12])
    assert torch.equal(first.params, again.params) and not torch.equal(first.params, other.params)
    assert torch.equal(task.batch(first, 4)["x"], task.batch(again, 4)["x"])
    heldout = ModuleTask(small_cnn(), half="meta_test")
    assert len(heldout.targets) + len(task.targets) == 512  # the two halves partition the dataset


def test_adam_lowers_the_loss_of_every_optimizee():
    task = ModuleTask(small_cnn(), batch_size=64)
    optimizees = task.sample(optimizee_seeds(0, 4, "meta_train"))
    params = optimizees.params.clone().requires_grad_(True)
    adam = torch.optim.Adam([params], lr=0.01)
    first = None
    for step in range(60):
        losses = task.batched_loss(params, optimizees, step)
        first = losses.detach() if first is None else first
        adam.zero_grad()
        losses.sum().backward()
        adam.step()
    assert (losses.detach() < 0.7 * first).all(), (first, losses)


def test_a_config_names_the_users_task_by_import_path(tmp_path):
    config = validate_config(
        {
            "task": {"kind": "module", "factory": "module_tasks:small_cnn", "batch_size": 16},
            "optimizer": {"kind": "phnn", "options": {"normalize": True}},
            "train": {
                "meta_steps": 2,
                "unroll": 5,
                "episode_length": 10,
                "batch_size": 2,
                "eval_every": 2,
                "eval_runs": 2,
                "estimator": {"second_order": False},
            },
            "device": "cpu",
        }
    )
    assert isinstance(make_task(config.task, "meta_test"), ModuleTask)
    trainer = MetaTrainer(config, tmp_path / "run")
    trainer.train(show_progress=False)
    assert trainer.meta_step == 2 and torch.isfinite(torch.tensor(trainer.history[-1]["heldout_loss"]))
    assert (tmp_path / "run" / "checkpoints" / "best" / "spec.json").exists()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("module_tasks", "String should match pattern"),
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("module_tasks:missing", "module_tasks has no function 'missing'"),
    ],
)
def test_a_wrong_factory_is_named(factory, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        config = validate_config({"task": {"kind": "module", "factory": factory}})
        make_task(config.task, "meta_train")
