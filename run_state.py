"""What a checkpoint holds besides the weights and the optimizer: the loop's record of the run
(TrainState) and every random generator it draws from (RandomState), each a stateful object with
state_dict() / load_state_dict() in plain types and tensors, which weights_only loading accepts.

    TrainState()            step, loss history, best validation loss: what the loop records; .healthy()
    RandomState()           Python, NumPy, torch's CPU, each CUDA device, MPS
    capture_rng_state(), restore_rng_state(state) -> names of the devices skipped
"""
import math
import random
from dataclasses import dataclass, field

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import numpy as np
import torch

from cli import log


HEALTHY_WINDOW = 100  # steps
HEALTHY_MARGIN = 1.0  # nats above the window's lowest training loss


@dataclass
class TrainState:
    """What the loop records: the last completed step, the losses so far and the best validation loss."""

    step: int = -1
    val_loss: float = None  # of `step`, when it was evaluated
    best_val_loss: float = float("inf")
    history: dict = field(default_factory=lambda: {"train": [], "val": []})

    def record(self, step, train_loss=None, val_loss=None):
        """This step's losses; True when val_loss is the best so far (NaN never is)."""
        self.step, self.val_loss = step, val_loss
        if train_loss is not None:
            self.history["train"].append([step, train_loss])
        if val_loss is None:
            return False
        self.history["val"].append([step, val_loss])
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)  # min(best, NaN) is best: NaN never wins
        return improved

    def healthy(self):
        """The last training loss is finite and not far above the recent minimum (HEALTHY_MARGIN nats above the
        lowest of the HEALTHY_WINDOW steps before it): a checkpoint of this state is one to go back to when
        the run blows up later. A step's loss moves by far less in training that works; a run that diverges
        climbs by orders of magnitude before it reaches NaN."""
        losses = [loss for _, loss in self.history["train"][-HEALTHY_WINDOW - 1:]]
        if not losses or not math.isfinite(losses[-1]):
            return not losses
        earlier = [loss for loss in losses[:-1] if math.isfinite(loss)]
        return not earlier or losses[-1] <= min(earlier) + HEALTHY_MARGIN

    def keep_best(self, val_loss):
        """A best validation loss from elsewhere (best_model.pt of the folder) that this run must beat."""
        self.best_val_loss = min(self.best_val_loss, val_loss)

    def state_dict(self):
        return {"step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "history": {key: list(losses) for key, losses in self.history.items()}}

    def load_state_dict(self, state):
        self.step, self.val_loss = state["step"], state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss", float("inf"))
        self.history = {key: [list(x) for x in state["history"][key]] for key in ("train", "val")}


class RandomState:
    """Every random generator the run draws from (Python, NumPy, torch's CPU, each CUDA device, MPS),
    as plain types and tensors, so weights_only loading accepts it."""

    def state_dict(self):
        return capture_rng_state()

    def load_state_dict(self, state):
        skipped = restore_rng_state(state)
        if skipped:
            log(f"the checkpoint's {' and '.join(skipped)} random state is not restored: no such device here "
                     f"(the CPU, Python and NumPy streams are)")


def capture_rng_state():
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state):
    """Every generator the checkpoint holds that this machine has; returns the names of those it
    skipped (a CUDA or MPS run resumed where that device is missing: nothing here draws from them)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": np.array(n["key"], dtype=np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if "cuda" in state and here["cuda"]:
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "mps" in state and here["mps"]:
        torch.mps.set_rng_state(state["mps"])
    return [name for name in ("cuda", "mps") if name in state and not here[name]]
