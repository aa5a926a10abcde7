"""Callbacks: hooks into the loop for what varies between runs.

Fine-tuning strategies plug in here: gradual unfreezing (``on_epoch_end`` flips
``requires_grad``; every parameter is already in the optimizer, frozen ones simply have
no gradient), best-checkpoint selection (``on_evaluate``), custom logging. A callback
may set ``state.should_stop = True`` to end training after the current step. Callbacks
with state to carry across a resume implement ``state_dict`` / ``load_state_dict``
(saved in every checkpoint, keyed by position in the callback list).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = ["BestModel", "Callback", "EarlyStopping"]


class Callback:
    """Base class: override the hooks you need. ``state`` is the loop's ``TrainState``
    (model, optimizer, scheduler, config, step, epoch, metrics ...)."""

    def on_train_begin(self, state) -> None:
        pass

    def on_step_end(self, state, metrics: dict[str, Any]) -> None:
        """After each optimizer step; ``metrics`` has loss, lr, grad_norm, tokens."""

    def on_evaluate(self, state, metrics: dict[str, Any]) -> None:
        """After each evaluation, before the checkpoint of that step is written."""

    def on_epoch_end(self, state) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``metric`` (lower is better unless ``mode="max"``) has not improved by
    more than ``min_delta`` for ``patience`` evaluations in a row (a NaN never improves)."""

    def __init__(self, patience: int, metric: str = "loss", *, mode: str = "min", min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.metric, self.mode, self.min_delta = patience, metric, mode, min_delta
        self.best: float | None = None
        self.bad_evaluations = 0

    def on_evaluate(self, state, metrics):
        if self.metric not in metrics:
            raise KeyError(f"EarlyStopping: metric {self.metric!r} not in evaluation metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if math.isfinite(value) and (self.best is None or sign * (self.best - value) > self.min_delta):
            self.best, self.bad_evaluations = value, 0
        else:
            self.bad_evaluations += 1
            if self.bad_evaluations >= self.patience:
                state.should_stop = True

    def state_dict(self):
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state):
        self.best, self.bad_evaluations = state["best"], state["bad_evaluations"]


class BestModel(Callback):
    """Keeps a CPU copy of the trainable weights at the best evaluation (``metric``,
    ``mode``) and restores them when training ends. With ``track_initial`` (gradual
    unfreezing: weights frozen at the best moment may change later) the initial values
    of all parameters are kept too, to restore those."""

    def __init__(self, metric: str, mode: str, *, track_initial: bool = False):
        self.metric, self.mode, self.track_initial = metric, mode, track_initial
        self.best: float | None = None
        self.best_step: int | None = None
        self.snapshot: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_begin(self, state):
        if self.track_initial:
            self.initial = {n: p.detach().to("cpu", copy=True) for n, p in state.model.named_parameters()}

    def on_evaluate(self, state, metrics):
        if self.metric not in metrics:
            raise KeyError(f"select_metric {self.metric!r} not in the evaluation metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if not math.isfinite(value):  # a diverged evaluation is never the best
            return
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_step = value, state.step
            self.snapshot = {n: p.detach().to("cpu", copy=True) for n, p in state.model.named_parameters() if p.requires_grad}

    def on_train_end(self, state):
        if not self.snapshot:
            return
        with torch.no_grad():
            for name, param in state.model.named_parameters():
                source = self.snapshot.get(name, self.initial.get(name))
                if source is not None:
                    param.copy_(source.to(param.device))

    def state_dict(self):
        # The weights go into the checkpoint too: a resumed run whose best evaluation came
        # before the checkpoint must still end on those weights, not on its last ones.
        # Sharded (DTensor) weights stay out: another world size could not load them.
        saved = {"best": self.best, "best_step": self.best_step}
        tensors = {**self.snapshot, **self.initial}
        if all(type(t) is torch.Tensor for t in tensors.values()):
            saved.update(snapshot=self.snapshot, initial=self.initial)
        return saved

    def load_state_dict(self, state):
        self.best, self.best_step = state["best"], state["best_step"]
        self.snapshot, self.initial = state.get("snapshot", {}), state.get("initial", self.initial)
        if self.best is not None and not self.snapshot:  # an older checkpoint, or sharded weights
            warnings.warn(f"the checkpoint keeps the best {self.metric} ({self.best:.4g} at step {self.best_step}) "
                          "but not its weights: the run ends on its last weights unless a later evaluation "
                          "is better", stacklevel=2)
