"""The meta-training task families: each builder's spec batches over optimizees, trains, and is reproducible."""

from __future__ import annotations

import re

import pytest
import torch

from metaopt.tasks import ModuleTask, optimizee_seeds
from metaopt.tasks.data import load_mnist
from metaopt.tasks.families import (
    VOCABULARY,
    WORDS,
    char_lm,
    generated_text,
    image_cnn,
    image_mlp,
    markov_transformer,
    teacher_student,
)

SEEDED = {"markov_transformer": markov_transformer, "char_lm": char_lm, "teacher_student": teacher_student}
BUILDERS = ["image_mlp", "image_mlp_8x8_tanh", "image_cnn", *SEEDED]


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(mnist_root, "test", False)


def build(name: str, mnist, seed: int = 0):
    """The spec of family ``name`` at its defaults (data from ``seed`` where the family has one)."""
    if name == "image_mlp":
        return image_mlp(*mnist)
    if name == "image_mlp_8x8_tanh":
        return image_mlp(*mnist, image_size=8, hidden_sizes=(16, 16), activation="tanh")
    if name == "image_cnn":
        return image_cnn(*mnist)
    return SEEDED[name](seed)


@pytest.mark.parametrize("name", BUILDERS)
def test_the_batched_loss_is_each_optimizees_own_module(name, mnist):
    spec = build(name, mnist)
    task = ModuleTask(spec, batch_size=32)
    seeds = [3, 5, 7]
    optimizees = task.sample(seeds)
    batched = task.batched_loss(optimizees.params, optimizees, step=4)
    batch = task.batch(optimizees, step=4)
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)  # the seed's own initialisation, drawn as ModuleTask draws it
        model = spec.model()
        flat = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
        assert torch.equal(optimizees.params[i], flat)
        torch.testing.assert_close(batched[i], spec.loss(model(batch["x"][i]), batch["y"][i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_adam_lowers_every_optimizees_loss_and_second_order_gradients_flow(name, mnist):
    spec = build(name, mnist)
    task, judge = ModuleTask(spec, batch_size=32), ModuleTask(spec, batch_size=256)
    optimizees = task.sample(optimizee_seeds(0, 4, "meta_train"))
    params = optimizees.params.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(task.batched_loss(params, optimizees, 0).sum(), params, create_graph=True)
    (curvature,) = torch.autograd.grad(gradient.square().sum(), params)  # what meta-gradients through a step need
    assert torch.isfinite(curvature).all() and curvature.abs().sum() > 0
    heldout_step = 10**6  # a minibatch of 256 that training never draws
    before = judge.batched_loss(params, optimizees, heldout_step).detach()
    adam = torch.optim.Adam([params], lr=0.01)
    for step in range(30):
        adam.zero_grad()
        task.batched_loss(params, optimizees, step).sum().backward()
        adam.step()
    after = judge.batched_loss(params, optimizees, heldout_step).detach()
    assert (after < 0.9 * before).all(), (before, after)


@pytest.mark.parametrize("name", list(SEEDED))
def test_a_data_seed_reproduces_its_data_and_another_differs(name):
    builder = SEEDED[name]
    rng_state = torch.get_rng_state()
    first, again, other = builder(1), builder(1), builder(2)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left to the initialisation
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs) and not torch.equal(first.targets, other.targets)
    params = [ModuleTask(spec).sample([4, 6]).params for spec in (first, again, other)]
    assert torch.equal(params[0], params[1]) and torch.equal(params[0], params[2])  # initialisation: optimizee seed
    assert first.inputs.dtype in (torch.float32, torch.int64) and first.targets.dtype in (torch.float32, torch.int64)


def test_images_are_downsampled_pixels_in_unit_range(mnist):
    images, labels = mnist
    full, small, cnn = image_mlp(images, labels), image_mlp(images, labels, image_size=8), image_cnn(images, labels)
    assert full.inputs.shape == (len(labels), 784) and small.inputs.shape == (len(labels), 64)
    assert cnn.inputs.shape == (len(labels), 1, 8, 8) and torch.equal(cnn.inputs.flatten(1), small.inputs)
    torch.testing.assert_close(full.inputs[:, :4].sum(), images[:, 0, :4].float().sum() / 255)
    torch.testing.assert_close(small.inputs[:, 0], images[:, :4, :4].float().mean((1, 2)) / 255)  # area averages
    assert full.inputs.dtype == torch.float32 and 0 <= small.inputs.min() and small.inputs.max() <= 1
    assert torch.equal(full.targets, labels)
    assert dict(image_cnn(images, labels, image_size=12, channels=(4,)).model().named_parameters())[
        "3.weight"
    ].shape == (10, 4 * 6 * 6)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        image_mlp(images, labels, activation="swish").model()


def test_the_markov_task_predicts_each_next_token_of_a_sparse_chain():
    spec = markov_transformer(3, vocab=8, length=16, examples=512)
    assert spec.inputs.shape == spec.targets.shape == (512, 16) and spec.inputs.dtype == torch.int64
    assert torch.equal(spec.targets[:, :-1], spec.inputs[:, 1:])
    pairs = torch.stack([spec.inputs.flatten(), spec.targets.flatten()], 1).unique(dim=0)
    assert len(pairs) == 8 * 2  # two successors per state: the chain is learnable
    model = spec.model()
    changed = spec.inputs[:2].clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 8
    logits, changed_logits = model(spec.inputs[:2]), model(changed)
    assert torch.equal(logits[:, :10], changed_logits[:, :10])  # causal: no position sees the ones after it
    assert not torch.allclose(logits[:, 10:], changed_logits[:, 10:])


def test_the_character_task_slides_a_context_over_the_generated_text():
    spec = char_lm(5, context=8, characters=3000)
    text = generated_text(5, 3000)
    assert spec.inputs.shape == (3000 - 8, 8) and spec.targets.shape == (3000 - 8,)
    assert "".join(VOCABULARY[i] for i in spec.targets) == text[8:]
    assert "".join(VOCABULARY[i] for i in spec.inputs[0]) == text[:8]
    assert torch.equal(spec.inputs[1:, :-1], spec.inputs[:-1, 1:])
    assert torch.equal(spec.inputs[1:, -1], spec.targets[:-1])
    assert spec.model()(spec.inputs[:5]).shape == (5, len(VOCABULARY))


def test_generated_text_is_deterministic_english_like_sentences_over_a_fixed_vocabulary():
    texts = [generated_text(seed, 20000) for seed in range(5)]
    assert texts[0] == generated_text(0, 20000) and texts[0] != texts[1]
    assert all(len(text) == 20000 for text in texts) and generated_text(0, 500) == texts[0][:500]
    assert set("".join(texts)) == set(VOCABULARY) and list(VOCABULARY) == sorted(VOCABULARY)
    known = {word.lower() for words in WORDS.values() for word in words} | {"an"}
    for text in texts:
        words = re.findall(r"[A-Za-z]+", text)
        assert {word.lower() for word in words[:-1]} <= known  # the last one may be cut off
        assert 2 < sum(map(len, words)) / len(words) < 7
        sentences = re.split(r"(?<=[.!]) ", text)[:-1]
        assert len(sentences) > 200
        for sentence in sentences:
            assert re.fullmatch(r"[A-Z][a-z]*( [A-Za-z]+,?)+[.!]", sentence), sentence
        assert re.search(r"\ba [aeiou]", text) is None  # "an" before a vowel


def test_the_teacher_targets_are_scaled_with_the_requested_noise():
    clean, noisy = teacher_student(1, noise=0.0, examples=4096), teacher_student(1, noise=0.5, examples=4096)
    assert clean.inputs.shape == (4096, 16) and clean.targets.shape == (4096, 1)
    torch.testing.assert_close(clean.targets.std(), torch.tensor(1.0))
    torch.testing.assert_close((noisy.targets - clean.targets).std(), torch.tensor(0.5), rtol=0.05, atol=0)
    student = teacher_student(1, hidden_sizes=(8, 8), activation="gelu").model()
    assert [tuple(p.shape) for p in student.parameters()] == [(8, 16), (8,), (8, 8), (8,), (1, 8), (1,)]
