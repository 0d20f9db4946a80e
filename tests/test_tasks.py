import pytest
import torch

from metaopt.tasks import DataNotFoundError, MnistMLP, Quadratic, optimizee_seeds
from metaopt.tasks.data import meta_split_indices


@pytest.fixture(scope="module")
def mnist(request):
    root = request.getfixturevalue("mnist_root")
    return MnistMLP(activation="sigmoid", hidden_sizes=[20], root=root, split="test", download=False, half="meta_test")


def unbatched_loss_and_grad(family, optimizees, index, params, step):
    """One optimizee alone: its own seed, its own data, no vmap."""
    single = family.sample([int(optimizees.seeds[index])])
    p = params[index].detach().clone().requires_grad_(True)
    batch = {k: v[0] for k, v in family.batch(single, step).items()}
    data = {k: v[0] for k, v in single.data.items()}
    loss = family.loss(p, data, batch)
    (grad,) = torch.autograd.grad(loss, p)
    return loss.detach(), grad


def batched_loss_and_grad(family, optimizees, params, step):
    p = params.detach().clone().requires_grad_(True)
    losses = family.batched_loss(p, optimizees, step)
    (grads,) = torch.autograd.grad(losses.sum(), p)
    return losses.detach(), grads


def test_quadratic_shapes_seeding_and_start():
    family = Quadratic(dim=7)
    optimizees = family.sample([3, 4, 5])
    assert optimizees.params.shape == (3, 7) and family.num_params == 7
    assert optimizees.data["W"].shape == (3, 7, 7) and optimizees.data["y"].shape == (3, 7)
    assert torch.all(optimizees.params == 0)  # θ₀ = 0
    again = family.sample([3, 4, 5])
    assert torch.equal(again.data["W"], optimizees.data["W"])  # a seed fixes its optimizee
    assert not torch.equal(optimizees.data["W"][0], optimizees.data["W"][1])
    # f(0) = ‖y‖²
    losses = family.batched_loss(optimizees.params, optimizees, 0)
    assert torch.allclose(losses, (optimizees.data["y"] ** 2).sum(-1))


def test_quadratic_batched_equals_one_at_a_time():
    family = Quadratic()
    optimizees = family.sample(optimizee_seeds(0, 6, "meta_train"))
    params = torch.randn(6, 10)
    losses, grads = batched_loss_and_grad(family, optimizees, params, step=0)
    for i in range(6):
        loss, grad = unbatched_loss_and_grad(family, optimizees, i, params, 0)
        torch.testing.assert_close(losses[i], loss)
        torch.testing.assert_close(grads[i], grad)
    # analytic gradient 2 Wᵀ(Wθ − y)
    W, y = optimizees.data["W"], optimizees.data["y"]
    expected = 2 * torch.einsum("bji,bj->bi", W, torch.einsum("bij,bj->bi", W, params) - y)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-4)


def test_mnist_shapes_and_initialisation(mnist):
    assert mnist.num_params == 784 * 20 + 20 + 20 * 10 + 10
    optimizees = mnist.sample([1, 2])
    assert optimizees.params.shape == (2, mnist.num_params)
    assert optimizees.params.abs().max() < 0.01  # N(0, 0.001²) weights, zero biases
    batch = mnist.batch(optimizees, step=0)
    assert batch["x"].shape == (2, 128, 784) and batch["y"].shape == (2, 128)
    assert 0.0 <= float(batch["x"].min()) and float(batch["x"].max()) <= 1.0
    losses = mnist.batched_loss(optimizees.params, optimizees, 0)
    torch.testing.assert_close(losses, torch.full((2,), 2.302585), atol=2e-3, rtol=0)  # ≈ ln 10 at init


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_mnist_batched_equals_one_at_a_time(mnist_root, activation):
    family = MnistMLP(
        activation=activation, hidden_sizes=[16, 8], root=mnist_root, split="test", download=False, half="meta_train"
    )
    optimizees = family.sample([11, 12, 13])
    params = optimizees.params + 0.1 * torch.randn_like(optimizees.params)
    for step in (0, 5):
        losses, grads = batched_loss_and_grad(family, optimizees, params, step)
        for i in range(3):
            loss, grad = unbatched_loss_and_grad(family, optimizees, i, params, step)
            torch.testing.assert_close(losses[i], loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads[i], grad, rtol=1e-4, atol=1e-6)


def test_mnist_minibatch_stream_is_per_optimizee_and_deterministic(mnist):
    alone = mnist.batch(mnist.sample([42]), step=3)["y"][0]
    among_others = mnist.batch(mnist.sample([7, 42, 9]), step=3)["y"][1]
    assert torch.equal(alone, among_others)  # independent of batch composition
    assert not torch.equal(mnist.batch(mnist.sample([42]), step=4)["y"][0], alone)  # new batch each step


def test_meta_split_is_a_fixed_disjoint_partition(mnist_root):
    train, test = meta_split_indices(10_000, "meta_train"), meta_split_indices(10_000, "meta_test")
    assert len(train) == len(test) == 5_000
    assert not set(train.tolist()) & set(test.tolist())
    assert (meta_split_indices(10_000, "meta_train") == train).all()
    halves = [MnistMLP(root=mnist_root, split="test", download=False, half=h) for h in ("meta_train", "meta_test")]
    assert halves[0].pixels.shape == halves[1].pixels.shape == (5_000, 784)


def test_optimizee_seeds_never_shared_between_splits():
    train = set(optimizee_seeds(0, 1000, "meta_train"))
    test = set(optimizee_seeds(0, 1000, "meta_test"))
    assert not train & test
    assert optimizee_seeds(3, 5, "meta_test") == optimizee_seeds(3, 5, "meta_test")


def test_missing_data_names_the_root(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        MnistMLP(root=str(tmp_path), split="train", download=False)
    message = str(error.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message
    assert "task.data.download" in message and "task.data.split: test" in message
