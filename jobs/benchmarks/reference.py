"""A reference meta-training loop written the way the L2L / OPT-ML code does it.

One ``nn.Module`` per optimizee, a Python loop over optimizees and over steps, gradients per
module with ``torch.autograd.grad``, the learned optimizer's network called once per parameter
tensor (as a module holding the meta-parameters, like L2L's ``meta_opt(grad, hidden)``), the
optimizee losses summed and backpropagated, then the same clipped Adam meta-step as ours.

It samples the same optimizees as ``metaopt.meta.MetaTrainer`` (``TaskFamily.sample`` with the
trainer's seeds) and copies their data, initial parameters and minibatches into the modules, so
for the same meta-parameters both compute the same meta-gradient.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.config import Config
from metaopt.optimizers import MetaParams, Optimizer, OptState
from metaopt.tasks import MnistMLP, Optimizees, Quadratic, TaskFamily, make_task, optimizee_seeds


class QuadraticOptimizee(nn.Module):
    """f(θ) = ‖Wθ − y‖² for one (W, y)."""

    def __init__(self, W: Tensor, y: Tensor, theta: Tensor):
        super().__init__()
        self.register_buffer("W", W.clone())
        self.register_buffer("y", y.clone())
        self.theta = nn.Parameter(theta.clone())

    def forward(self) -> Tensor:
        residual = self.W @ self.theta - self.y
        return (residual * residual).sum()


class MnistOptimizee(nn.Module):
    """The MNIST MLP (784 → hidden… → 10) as ordinary ``nn.Linear`` layers; cross-entropy."""

    def __init__(self, family: MnistMLP, flat_params: Tensor):
        super().__init__()
        layers: list[nn.Module] = []
        offset = 0
        for index, (fan_in, fan_out) in enumerate(family.layer_shapes):
            linear = nn.Linear(fan_in, fan_out, device=flat_params.device)
            with torch.no_grad():  # metaopt's flat layout: weight [fan_in, fan_out] row-major, then bias
                linear.weight.copy_(flat_params[offset : offset + fan_in * fan_out].view(fan_in, fan_out).T)
                offset += fan_in * fan_out
                linear.bias.copy_(flat_params[offset : offset + fan_out])
                offset += fan_out
            layers.append(linear)
            if index < len(family.layer_shapes) - 1:
                layers.append({"sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[family.activation])
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.net(x), y)


def calling_network_directly(optimizer: Optimizer, network: nn.Module) -> Optimizer:
    """``optimizer`` whose network is the module ``network`` called with its own parameters (the
    meta-parameters), as L2L code calls its meta-optimizer module, instead of a functional call."""
    direct = copy.copy(optimizer)
    direct.network = network
    direct.apply = lambda meta_params, *inputs, **kwargs: network(*inputs, **kwargs)
    return direct


class ReferenceTrainer:
    """L2L-style meta-training of ``config.optimizer`` on ``config.task`` with ``meta_params``."""

    def __init__(self, config: Config, meta_params: MetaParams, device: torch.device):
        train = config.train
        if train.estimator.kind != "tbptt":
            raise ValueError("the reference loop implements truncated backprop (estimator.kind: tbptt) only")
        self.config, self.device = config, device
        self.family: TaskFamily = make_task(config.task, "meta_train", device)
        optimizer = config.optimizer.build()
        self.network = optimizer.build_network().to(device)
        self.network.load_state_dict({k: v.detach() for k, v in meta_params.items()})
        self.optimizer = calling_network_directly(optimizer, self.network)
        self.meta_optimizer = torch.optim.Adam(self.network.parameters(), lr=train.meta_lr)
        self.episode = 0
        self.step = train.episode_length  # start the first episode on the first meta-step
        self.modules: list[nn.Module] = []
        self.params: list[dict[str, Tensor]] = []  # per optimizee: name -> current tensor
        self.states: list[dict[str, OptState]] = []  # per optimizee: name -> optimizer state
        self.optimizees: Optimizees | None = None

    def _start_episode(self) -> None:
        train = self.config.train
        seeds = optimizee_seeds(train.seed, train.batch_size, "meta_train", stream=self.episode)
        self.optimizees = self.family.sample(seeds)
        self.modules, self.params, self.states = [], [], []
        for b in range(len(seeds)):
            if isinstance(self.family, Quadratic):
                module = QuadraticOptimizee(
                    self.optimizees.data["W"][b], self.optimizees.data["y"][b], self.optimizees.params[b]
                )
            else:
                module = MnistOptimizee(self.family, self.optimizees.params[b])
            self.modules.append(module)
            self.params.append({name: p.detach() for name, p in module.named_parameters()})
            self.states.append(
                {name: self.optimizer.init_state(p.reshape(-1)) for name, p in module.named_parameters()}
            )
        self.step = 0

    def _loss(self, b: int, params: dict[str, Tensor], step: int) -> Tensor:
        """Optimizee ``b``'s loss at ``params`` on its minibatch for ``step``."""
        if isinstance(self.family, Quadratic):
            return torch.func.functional_call(self.modules[b], params, ())
        one = Optimizees(self.optimizees.seeds[b : b + 1], self.optimizees.params[b : b + 1])
        batch = self.family.batch(one, step)
        return torch.func.functional_call(self.modules[b], params, (batch["x"][0], batch["y"][0]))

    def meta_gradient(self) -> tuple[MetaParams, float]:
        """Unroll every optimizee for one truncation, one at a time; the meta-gradient of the summed
        (over steps) mean (over optimizees) loss, and that mean loss per step."""
        train = self.config.train
        if self.step >= train.episode_length:
            self._start_episode()
            self.episode += 1
        length = min(train.unroll, train.episode_length - self.step)
        second_order = train.estimator.second_order
        self.network.zero_grad(set_to_none=True)
        total = 0.0
        for b in range(len(self.modules)):
            params = {name: p.detach().requires_grad_(True) for name, p in self.params[b].items()}
            states = self.states[b]
            loss = self._loss(b, params, self.step)
            summed = 0.0
            for i in range(length):
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order, retain_graph=True)
                new_params, new_states = {}, {}
                for (name, p), grad in zip(params.items(), grads):
                    grad = grad if second_order else grad.detach()
                    update, new_states[name] = self.optimizer.update({}, grad.reshape(-1), states[name], self.step + i)
                    new_params[name] = p + update.view_as(p)
                params, states = new_params, new_states
                loss = self._loss(b, params, self.step + i + 1)
                summed = summed + loss
            (summed / len(self.modules)).backward()
            total += float(summed.detach())
            self.params[b] = {name: p.detach() for name, p in params.items()}
            self.states[b] = {name: {k: v.detach() for k, v in s.items()} for name, s in states.items()}
        self.step += length
        grads = {
            name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in self.network.named_parameters()
        }
        return grads, total / (length * len(self.modules))

    def meta_gradient_step(self) -> float:
        """One meta-step: the meta-gradient, clipped to ``grad_clip``, applied by Adam."""
        grads, meta_loss = self.meta_gradient()
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
        clip = self.config.train.grad_clip
        scale = min(1.0, clip / (norm + 1e-12)) if clip else 1.0
        if math.isfinite(norm):
            for param in self.network.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
            self.meta_optimizer.step()
        return meta_loss
