"""The user-scale suite's tasks (metaopt/tasks/userscale.py), built shrunk: sizes, learning, splits, seeds."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import pytest
import torch

from metaopt.benchmark import load_suite
from metaopt.tasks import ModuleTask, ModuleTaskSpec
from metaopt.tasks import userscale as us

SUITE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "suite_userscale.yaml"

# Each task shrunk to run in a second or two; the fine-tuning task pretrains for a few steps.
SHRUNK = {
    "text_transformer_lm": dict(d_model=16, heads=2, layers=1, context=16, stride=64),
    "text_lstm_lm": dict(embed=8, hidden=32, context=16, stride=64),
    "code_finetune_gru": dict(embed=16, hidden=48, context=16, stride=64, pretrain_steps=60, pretrain_lr=1e-2),
    "photo_denoising_cnn": dict(width=8, depth=3, patch=8),
    "digits_mixer": dict(channels=16, layers=1, token_hidden=8, channel_hidden=32),
    "photo_coordinate_mlp": dict(width=32, depth=2, octaves=4, downsample=8),
}
# The full configurations need no training to count their parameters; the fine-tuning task skips pretraining.
FULL = {name: {} for name in SHRUNK} | {"code_finetune_gru": dict(pretrain_steps=0)}
TEXT_TASKS = ("text_transformer_lm", "text_lstm_lm", "code_finetune_gru")


@pytest.fixture(scope="module")
def specs() -> dict[str, ModuleTaskSpec]:
    return {name: getattr(us, name)(**options) for name, options in SHRUNK.items()}


def parameters(spec: ModuleTaskSpec, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.cat([p.detach().flatten() for p in spec.model().parameters()])


def row_hashes(tensor: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in tensor.contiguous()}


def test_the_suite_names_every_task_and_validates():
    suite = load_suite(SUITE)
    factories = {entry.task.factory for entry in suite.tasks}
    assert factories == {f"metaopt.tasks.userscale:{name}" for name in SHRUNK}
    assert all(500 <= entry.steps <= 5000 for entry in suite.tasks)
    assert max(entry.steps for entry in suite.tasks) >= 3000


@pytest.mark.parametrize("name", list(SHRUNK))
def test_the_full_configuration_has_user_scale_parameters(name):
    spec = getattr(us, name)(**FULL[name])
    count = parameters(spec).numel()
    assert 1e5 <= count <= 2e6, f"{name}: {count} parameters"
    data = (spec.inputs, spec.targets, spec.validation_inputs, spec.validation_targets)
    assert sum(t.numel() * t.element_size() for t in data) < 200e6


@pytest.mark.parametrize("name", list(SHRUNK))
def test_adamw_lowers_the_training_loss(specs, name):
    spec = specs[name]
    torch.manual_seed(0)
    model = spec.model()
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        index = torch.randint(0, len(spec.inputs), (32,), generator=generator)
        loss = spec.loss(model(spec.inputs[index]), spec.targets[index])
        adamw.zero_grad()
        loss.backward()
        adamw.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5]), losses
    with torch.no_grad():
        outputs = model(spec.validation_inputs[:256])
        assert torch.isfinite(spec.loss(outputs, spec.validation_targets[:256]))
        assert torch.isfinite(spec.metric(outputs, spec.validation_targets[:256]))


@pytest.mark.parametrize("name", list(SHRUNK))
def test_torch_func_batches_the_model_over_optimizees(specs, name):
    """The benchmark's baselines run every task through ModuleTask's vmap of the module's own forward."""
    task = ModuleTask(specs[name], batch_size=4, half="meta_test")
    optimizees = task.sample([3, 5])
    batched = task.batched_loss(optimizees.params, optimizees, step=1)
    batch = task.batch(optimizees, step=1)
    for i, seed in enumerate([3, 5]):
        torch.manual_seed(seed)
        model = task.definition.model()
        torch.func.replace_all_batch_norm_modules_(model)
        torch.testing.assert_close(batched[i], task.definition.loss(model(batch["x"][i]), batch["y"][i]))


@pytest.mark.parametrize("name", list(SHRUNK))
def test_a_seed_gives_the_same_initialisation_and_data(specs, name):
    spec, again = specs[name], getattr(us, name)(**SHRUNK[name])
    assert torch.equal(parameters(spec, 7), parameters(again, 7))
    if name != "code_finetune_gru":  # every fine-tuning run starts from the same pretrained weights
        assert not torch.equal(parameters(spec, 7), parameters(spec, 8))
    for field in ("inputs", "targets", "validation_inputs", "validation_targets"):
        assert torch.equal(getattr(spec, field), getattr(again, field)), field


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_windows_come_from_disjoint_blocks(specs, name):
    spec, options = specs[name], SHRUNK[name]
    context, stride = options["context"], options["stride"]
    text = us.python_code_text() if name == "code_finetune_gru" else us.python_docs_text()
    ids = us.encode(text)
    training, validation = us.split_blocks(ids)
    assert torch.equal(torch.cat([training, validation]), ids)
    assert len(validation) == round(0.1 * len(ids))
    # Window k of the training block is training[k · stride : k · stride + context], its targets shifted by one;
    # the last target lies inside the training block, so no window reaches the validation block.
    count = len(spec.inputs)
    assert (count - 1) * stride + context < len(training) <= count * stride + context
    for k in (0, count // 2, count - 1):
        assert torch.equal(spec.inputs[k], training[k * stride : k * stride + context])
        assert torch.equal(spec.targets[k], training[k * stride + 1 : k * stride + context + 1])
    for k in (0, len(spec.validation_inputs) - 1):
        assert torch.equal(spec.validation_inputs[k], validation[k * context : (k + 1) * context])
        assert torch.equal(spec.validation_targets[k], validation[k * context + 1 : (k + 1) * context + 1])
    assert spec.inputs.dtype == spec.targets.dtype == torch.int64 and spec.inputs.shape[1] == context


@pytest.mark.parametrize(
    "name, field",
    [("photo_denoising_cnn", "targets"), ("digits_mixer", "inputs"), ("photo_coordinate_mlp", "inputs")],
)
def test_image_validation_examples_are_not_training_examples(specs, name, field):
    """Clean tiles (the noisy inputs differ anyway), digit images, pixel coordinates."""
    spec = specs[name]
    training, validation = row_hashes(getattr(spec, field)), row_hashes(getattr(spec, f"validation_{field}"))
    assert validation and not training & validation


def test_the_image_split_is_a_seeded_permutation():
    training, validation = us.seeded_split(100, 0.2)
    assert len(validation) == 20 and sorted(torch.cat([training, validation]).tolist()) == list(range(100))
    assert torch.equal(validation, us.seeded_split(100, 0.2)[1])


def test_fine_tuning_starts_from_the_pretrained_weights(specs):
    options = SHRUNK["code_finetune_gru"]
    spec = specs["code_finetune_gru"]
    sizes = options["embed"], options["hidden"], options["context"]
    pretrained = us.pretrained_gru(*sizes, options["pretrain_steps"], 32, options["pretrain_lr"], 0)
    hits = us.pretrained_gru.cache_info().hits
    us.code_finetune_gru(**options)
    assert us.pretrained_gru.cache_info().hits > hits  # cached in-process
    model = spec.model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    torch.manual_seed(0)
    fresh = us.GRULanguageModel(len(us.VOCABULARY), options["embed"], options["hidden"])
    with torch.no_grad():
        batch = spec.inputs[:256], spec.targets[:256]
        assert spec.loss(model(batch[0]), batch[1]) < spec.loss(fresh(batch[0]), batch[1]) - 0.5


def test_fine_tuning_shifts_from_prose_to_code():
    prose, code = us.encode(us.python_docs_text()), us.encode(us.python_code_text())
    frequencies = [torch.bincount(ids, minlength=len(us.VOCABULARY)) / len(ids) for ids in (prose, code)]
    assert 0.5 * (frequencies[0] - frequencies[1]).abs().sum() > 0.1  # total variation between the two
    assert us.python_docs_text()[:2000] not in us.python_code_text()


def test_the_vocabulary_covers_the_text():
    ids = us.encode(us.python_docs_text())
    assert len(us.VOCABULARY) == 97 and ids.max() < 97
    assert (ids == 0).float().mean() < 0.01  # characters outside the vocabulary are rare


def test_a_downloaded_corpus_is_read_from_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        us.text_corpus("tiny_shakespeare", root=tmp_path)
    (tmp_path / "tiny_shakespeare.txt").write_text("First Citizen:\nBefore we proceed any further.\n" * 50)
    spec = us.text_transformer_lm(d_model=8, heads=1, layers=1, context=8, corpus="tiny_shakespeare", root=tmp_path)
    assert us.VOCABULARY[spec.inputs[0, 0]] == "F"
    with pytest.raises(ValueError, match="unknown corpus"):
        us.text_corpus("nope")


def test_every_factory_has_keyword_defaults():
    for name in SHRUNK:
        signature = inspect.signature(getattr(us, name))
        assert all(parameter.default is not inspect.Parameter.empty for parameter in signature.parameters.values())
