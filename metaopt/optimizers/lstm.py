"""The coordinatewise LSTM optimizer of Andrychowicz et al. 2016, "Learning to learn by gradient descent
by gradient descent"."""

from __future__ import annotations

import ctypes
from typing import Literal

import torch
from torch import Tensor, nn

from metaopt.optimizers.base import MetaParams, NetworkOptimizer, OptState
from metaopt.optimizers.features import log_sign_constants, log_sign_preprocess
from metaopt.optimizers.ops import define_kernel_ops

_MAX_FUSED_HIDDEN, _MAX_FUSED_LAYERS = 64, 4  # MAX_HIDDEN, MAX_LAYERS in csrc/lstm_step.c


class LSTMKernelOptions(ctypes.Structure):
    """``Options`` of ``csrc/lstm_step.c``, field by field."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("in_size", "hidden", "layers")),
        *((name, ctypes.c_float) for name in ("threshold", "log_divisor", "small_scale", "out_mul", "lr")),
    ]


def _lstm_cell(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``cell``'s step written out (same weights and gate order), so torch.func.vmap can batch it
    over perturbed meta-parameters (ES/PES); ``aten::lstm_cell`` has no batching rule."""
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class _StackedLSTM(nn.Module):
    """Stacked ``LSTMCell`` layers and a linear read-out, one time step for a batch of coordinates."""

    def __init__(self, input_size: int, hidden: int, layers: int, zero_head: bool):
        super().__init__()
        sizes = [input_size] + [hidden] * (layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(size, hidden) for size in sizes)
        self.head = nn.Linear(hidden, 1)
        if zero_head:
            # A zero read-out: the untrained optimizer leaves the optimizee where it is. torch's default
            # (random weights and bias) adds the same drift to every coordinate, which on sigmoid MNIST
            # kept the meta-loss at ln 10 for 50 meta-steps; from zero it fell to 1.9 in 20.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, inputs: Tensor, hc: Tensor) -> tuple[Tensor, Tensor]:
        """``inputs`` [rows, features], ``hc`` [rows, layers, 2, hidden] (h, c) -> (output [rows], next hc)."""
        states = []
        x = inputs
        for layer, cell in enumerate(self.cells):
            x, c_layer = _lstm_cell(cell, x, hc[:, layer, 0], hc[:, layer, 1])
            states += [x, c_layer]
        return self.head(x).squeeze(-1), torch.stack(states, dim=1).reshape(hc.shape)


class CoordinatewiseLSTM(NetworkOptimizer):
    """Two stacked LSTM layers shared by every coordinate; the update is ``out_mul`` times its output.

    Input per coordinate: log/sign-preprocessed gradient (2 features) or the raw gradient (1).
    The linear read-out starts at zero, so untrained it makes no update; ``init="published"`` keeps
    PyTorch's random init there, as the original (its layers are built in the same order, so under the
    same ``torch.manual_seed`` every weight equals the original's). State: ``hc``, h and c of
    each layer, ``[..., layers, 2, hidden]``. ``fused_step`` runs the no-grad step in one native pass
    (``csrc/lstm_step.c``), and first-order meta-training runs through it and a hand-written backward
    (hidden <= 64, layers <= 4).
    Meta-parameters, with ``I`` inputs, ``H = hidden`` and ``L = layers``:
    ``4H(I + H + 2) + (L - 1)·4H(2H + 2) + H + 1``; 5,301 at the defaults (I=2, H=20, L=2).
    """

    kind = "lstm"

    def __init__(
        self,
        hidden: int = 20,
        layers: int = 2,
        preprocess: bool = True,
        preprocess_p: float = 10.0,
        out_mul: float = 0.1,
        init: Literal["metaopt", "published"] = "metaopt",
    ):
        if init not in ("metaopt", "published"):
            raise ValueError(f"init must be 'metaopt' or 'published', got {init!r}")
        self.init = init
        self.hidden = hidden
        self.layers = layers
        self.preprocess = preprocess
        self.preprocess_p = preprocess_p
        self.out_mul = out_mul
        super().__init__()

    @property
    def input_size(self) -> int:
        """Features per coordinate fed to the first LSTM layer."""
        return 2 if self.preprocess else 1

    def build_network(self) -> nn.Module:
        return _StackedLSTM(self.input_size, self.hidden, self.layers, zero_head=self.init == "metaopt")

    def init_state(self, params: Tensor) -> OptState:
        return {"hc": params.new_zeros(params.shape + (self.layers, 2, self.hidden))}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        fused = self._fused_meta_update(meta_params, grads, state, step)
        if fused is not None:
            return fused
        inputs = log_sign_preprocess(grads, self.preprocess_p) if self.preprocess else grads.unsqueeze(-1)
        output, hc = self.apply(
            meta_params, inputs.reshape(-1, self.input_size), state["hc"].reshape(-1, self.layers, 2, self.hidden)
        )
        return self.out_mul * output.reshape(grads.shape), {"hc": hc.reshape(state["hc"].shape)}

    def _fused_unsupported(self) -> str | None:
        if self.hidden > _MAX_FUSED_HIDDEN or self.layers > _MAX_FUSED_LAYERS:
            return (
                f"the fused lstm step takes hidden <= {_MAX_FUSED_HIDDEN} and layers <= "
                f"{_MAX_FUSED_LAYERS}, got {self.hidden} and {self.layers}"
            )
        return None

    def fused_weights(self, meta_params: MetaParams) -> Tensor:
        packed = []
        for layer in range(self.layers):  # W = [weight_ih, weight_hh], b = bias_ih + bias_hh
            cell = f"cells.{layer}."
            packed += [
                torch.cat([meta_params[cell + "weight_ih"], meta_params[cell + "weight_hh"]], dim=1),
                meta_params[cell + "bias_ih"] + meta_params[cell + "bias_hh"],
            ]
        packed += [meta_params["head.weight"], meta_params["head.bias"]]
        return torch.cat([w.reshape(-1) for w in packed]).to(torch.float32)

    def _fused_scalars(self, meta_params: MetaParams, step: int | Tensor, lr: float) -> tuple[Tensor, dict]:
        settings = dict(
            in_size=self.input_size,
            hidden=self.hidden,
            layers=self.layers,
            **log_sign_constants(self.preprocess_p),
            out_mul=self.out_mul,
            lr=lr,
        )
        return meta_params["head.bias"].new_zeros(0, dtype=torch.float32), settings

    def _fused_meta_supported(self) -> bool:
        return True


LSTM_OPS = define_kernel_ops("lstm_step", LSTMKernelOptions)
CoordinatewiseLSTM.fused_kernel = LSTM_OPS
