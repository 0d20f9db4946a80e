"""MLflow "model from code" for a metaopt optimizer: nothing is pickled when it is logged.

``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict([...])`` applies the optimizer to flat gradient
vectors, one ``OptimizerInput`` per vector (MLflow validates them against its type hints):

    [{"grads": [...], "state": {name: [...]} or absent, "step": int (default 0)}, ...]
    -> [OptimizerOutput(updates=[...], state={name: [...]}), ...]

Pass the returned state (and step + 1) back in on the next call.
"""

from __future__ import annotations

import mlflow
import pydantic
import torch

from metaopt.meta.checkpoint import load_checkpoint


class OptimizerInput(pydantic.BaseModel):
    """One flat gradient vector, the optimizer state the previous call returned (absent at first) and its step."""

    grads: list[float]
    state: dict[str, list[float]] | None = None
    step: int = 0


class OptimizerOutput(pydantic.BaseModel):
    """The additive updates for the gradients and the next state (each state tensor flattened)."""

    updates: list[float]
    state: dict[str, list[float]]


class MetaoptOptimizerModel(mlflow.pyfunc.PythonModel):
    """Maps gradients and optimizer state to updates with the checkpoint in artifact ``checkpoint``."""

    def load_context(self, context) -> None:
        self.optimizer, self.meta_params, self.spec = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: list[OptimizerInput], params=None) -> list[OptimizerOutput]:
        return [self._step(one) for one in model_input]

    def _step(self, one: OptimizerInput) -> OptimizerOutput:
        grads = torch.tensor(one.grads, dtype=torch.float32)
        state = self.optimizer.init_state(grads)
        for key, value in (one.state or {}).items():
            state[key] = torch.tensor(value, dtype=torch.float32).reshape(state[key].shape)
        with torch.no_grad():
            updates, new_state = self.optimizer.update(self.meta_params, grads, state, one.step)
        flat_state = {key: value.reshape(-1).tolist() for key, value in new_state.items()}
        return OptimizerOutput(updates=updates.tolist(), state=flat_state)


mlflow.models.set_model(MetaoptOptimizerModel())
