"""MLflow "model from code" for a metaopt optimizer: nothing is pickled when it is logged.

``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(model_input)`` applies the optimizer to
one flat vector of gradients:

    model_input = {"grads": [...], "state": {name: nested list} or absent, "step": int (default 0)}
    -> {"updates": np.ndarray shaped like grads, "state": {name: np.ndarray}}

Pass the returned state (and step + 1) back in on the next call.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from metaopt.meta.checkpoint import load_checkpoint


class MetaoptOptimizerModel(mlflow.pyfunc.PythonModel):
    """Maps gradients and optimizer state to updates with the checkpoint in artifact ``checkpoint``."""

    def load_context(self, context) -> None:
        self.optimizer, self.meta_params, self.spec = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        grads = torch.as_tensor(np.asarray(model_input["grads"], dtype=np.float32)).reshape(-1)
        state = model_input.get("state") or self.optimizer.init_state(grads)
        state = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
        with torch.no_grad():
            updates, new_state = self.optimizer.update(self.meta_params, grads, state, int(model_input.get("step", 0)))
        return {"updates": updates.numpy(), "state": {k: v.numpy() for k, v in new_state.items()}}


mlflow.models.set_model(MetaoptOptimizerModel())
