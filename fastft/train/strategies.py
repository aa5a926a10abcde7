"""Fine-tuning strategies: which parameters train, at which learning rate, and when.

``strategy=``

    full              every parameter trains
    features          frozen backbone: only the new task head trains (features extraction)
    freeze            ``freeze_first=k`` (the embeddings and the first k layers) or
                      ``train_last=k`` (all but the last k layers) are frozen;
                      ``extra_layers=n`` adds n new hidden layers to the head
    gradual-unfreeze  ULMFiT (Howard & Ruder 2018, §3.3): start with the head only, unfreeze
                      one more layer group from the top every ``unfreeze_every`` epochs, at
                      the epochs of ``unfreeze_schedule``, or on a plateau of the evaluation
                      metric (``unfreeze_on="plateau"``), until everything trains
    lora / adapter / prefix / prompt   ``fastft.peft.apply(model, method, **options)``

Layer groups, bottom to top: ``embeddings``, ``layer.0`` ... ``layer.{L-1}`` (modules after
the last layer, e.g. BERT's pooler or a final norm, join the top layer's group), ``head``
(the freshly initialised task head: ``classifier`` / ``qa_outputs`` / ``score``).

Learning rates per group (``lr_scheme=``):

    discriminative    ULMFiT §3.2: the head at ``lr``, each lower group at the rate of the
                      group above ÷ ``lr_factor`` (default 2.6)
    layerwise         ELECTRA's layer-wise decay (Clark et al. 2020, App. A): group at
                      depth d below the head gets ``lr · decay^d`` (default decay 0.8)

Schedules: ``slanted_triangular`` (ULMFiT eq. 3, ``cut_frac`` 0.1, ``ratio`` 32) registers
into ``fastft.train.schedules.SCHEDULES`` next to warmup + linear / cosine.

Frozen parameters stay in the optimizer with ``requires_grad=False``: they get no gradient,
so AdamW skips them entirely (no weight decay either) and they stay bitwise unchanged;
unfreezing one later needs no new optimizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fastft.train.callbacks import Callback
from fastft.train.schedules import SCHEDULES, register_schedule

__all__ = [
    "LR_SCHEMES",
    "STRATEGIES",
    "GradualUnfreezing",
    "LayerGroups",
    "StrategyPlan",
    "add_head_layers",
    "apply_strategy",
    "layer_groups",
    "lr_param_groups",
    "slanted_triangular",
]

STRATEGIES = ("full", "features", "freeze", "gradual-unfreeze", "lora", "adapter", "prefix", "prompt")
PEFT_STRATEGIES = ("lora", "adapter", "prefix", "prompt")
LR_SCHEMES = (None, "discriminative", "layerwise")
HEAD_NAMES = ("classifier", "qa_outputs", "score")


# ------------------------------------------------------------------------ schedule


@register_schedule("slanted_triangular")
def slanted_triangular(
    step: int, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, cut_frac: float = 0.1,
    ratio: float = 32.0,
) -> float:
    """ULMFiT's slanted triangular multiplier (Howard & Ruder 2018, eq. 3):

        cut = floor(T · cut_frac)
        p   = t / cut                                   if t < cut
              1 − (t − cut) / (cut · (1/cut_frac − 1))  otherwise
        η_t = η_max · (1 + p · (ratio − 1)) / ratio

    A short linear rise over the first ``cut_frac`` of the steps, then a long linear decay,
    from ``η_max / ratio`` up to ``η_max`` and back. ``warmup_steps`` and ``min_lr_ratio``
    are ignored (the shape has its own rise and floor)."""
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"slanted_triangular: cut_frac must be in (0, 1), got {cut_frac}")
    if ratio < 1.0:
        raise ValueError(f"slanted_triangular: ratio must be >= 1, got {ratio}")
    cut = max(1, math.floor(total_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = 1.0 - (step - cut) / (cut * (1.0 / cut_frac - 1.0))
    return (1.0 + max(p, 0.0) * (ratio - 1.0)) / ratio


assert "slanted_triangular" in SCHEDULES


# ------------------------------------------------------------------------ layer groups


@dataclass
class LayerGroups:
    """Parameter names of a model split into groups, bottom (embeddings) to top (head)."""

    names: list[str]  # group names, bottom to top: "embeddings", "layer.0", ..., "head"
    params: dict[str, list[str]]  # group name -> parameter names

    @property
    def num_layers(self) -> int:
        return sum(1 for n in self.names if n.startswith("layer."))

    def parameters(self, model: nn.Module, group: str) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.params[group]]


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's block list: the longest ``nn.ModuleList`` whose name ends in
    ``layer`` / ``layers`` / ``h`` / ``blocks`` (BERT, Llama, GPT-2, ...)."""
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layer|layers|h|blocks)$", name) and len(module) > 0
    ]
    if not candidates:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__} (no ModuleList named layer/layers/h)")
    return max(candidates, key=lambda item: len(item[1]))


def layer_groups(model: nn.Module, head_names: Sequence[str] = HEAD_NAMES) -> LayerGroups:
    """Group ``model``'s parameters by depth. A parameter under ``<layers>.<i>.`` joins
    ``layer.i``; under a module whose last name is in ``head_names`` joins ``head``; one
    registered before the first layer (embeddings) joins ``embeddings``; the rest (pooler,
    final norm, an LM head) join the top layer's group. Parameters added by fastft.peft
    inside a layer join that layer's group; virtual-token encoders join ``embeddings``.

    Raises:
        ValueError: no transformer layer list found.
    """
    prefix, layers = _layer_list(model)
    num_layers = len(layers)
    groups: dict[str, list[str]] = {"embeddings": [], **{f"layer.{i}": [] for i in range(num_layers)}, "head": []}
    layer_pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    seen_layer = False
    for name, _ in model.named_parameters():
        parts = name.split(".")
        match = layer_pattern.match(name)
        if any(part in head_names for part in parts[:-1]):
            groups["head"].append(name)
        elif match:
            groups[f"layer.{int(match.group(1))}"].append(name)
            seen_layer = True
        elif not seen_layer or "embed" in name or "prompt" in name or "prefix" in name:
            groups["embeddings"].append(name)
        else:
            groups[f"layer.{num_layers - 1}"].append(name)
    names = [n for n in groups if groups[n] or n.startswith("layer.")]
    return LayerGroups(names=names, params={n: groups[n] for n in names})


def lr_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    scheme: str | None = None,
    *,
    factor: float | None = None,
    groups: LayerGroups | None = None,
) -> list[dict]:
    """Torch optimizer parameter groups with per-layer-group learning rates.

    ``scheme=None``: every group at ``lr``. ``"discriminative"``: group at depth d below the
    head at ``lr / factor**d`` (factor 2.6). ``"layerwise"``: ``lr * factor**d`` (0.8). The
    head has depth 0. Each layer group is split into decayed (matrices) and non-decayed
    (biases, norm scales) parts. *All* parameters are included, frozen ones too (see the
    module docstring). Each dict carries ``"name"`` (``"layer.3/decay"``) for inspection.
    """
    if scheme not in LR_SCHEMES:
        raise ValueError(f"lr_scheme must be one of {LR_SCHEMES}, got {scheme!r}")
    groups = groups or layer_groups(model)
    named = dict(model.named_parameters())
    result = []
    top_to_bottom = list(reversed(groups.names))
    for depth, group in enumerate(top_to_bottom):
        if scheme == "discriminative":
            group_lr = lr / (factor or 2.6) ** depth
        elif scheme == "layerwise":
            group_lr = lr * (factor or 0.8) ** depth
        else:
            group_lr = lr
        params = [named[n] for n in groups.params[group]]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        if decay:
            result.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": f"{group}/decay"})
        if no_decay:
            result.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{group}/no_decay"})
    covered = {id(p) for g in result for p in g["params"]}
    missing = [n for n, p in named.items() if id(p) not in covered]
    assert not missing, f"parameters outside every layer group: {missing[:5]}"
    return result


# ------------------------------------------------------------------------ freezing


def set_trainable(model: nn.Module, names: Sequence[str], trainable: bool) -> None:
    named = dict(model.named_parameters())
    for n in names:
        named[n].requires_grad_(trainable)


def add_head_layers(model: nn.Module, num_layers: int, head_names: Sequence[str] = HEAD_NAMES) -> nn.Module:
    """Put ``num_layers`` new hidden layers (Linear → GELU → Dropout, hidden width) in front
    of the task head's output projection (``classifier`` / ``qa_outputs`` / ``score``).

    Returns the new head module. Raises ValueError when the model has no such head or the
    head is not a single ``nn.Linear``."""
    for head_name in head_names:
        head = getattr(model, head_name, None)
        if head is not None:
            break
    else:
        raise ValueError(f"extra_layers: {type(model).__name__} has no task head named {list(head_names)}")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"extra_layers: the head {head_name!r} is a {type(head).__name__}, not a single nn.Linear")
    width = head.in_features
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(width, width), nn.GELU(), nn.Dropout(getattr(model.config, "hidden_dropout_prob", 0.1))]
    new_head = nn.Sequential(*layers, head).to(head.weight.device, head.weight.dtype)
    setattr(model, head_name, new_head)
    return new_head


class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing (Howard & Ruder 2018, §3.3).

    At the start only the top group (the head) trains. Then one more group, from the top
    down, becomes trainable: every ``every`` epochs (``on="epoch"``), at the epochs listed
    in ``schedule`` (``schedule[i]`` = the epoch after which the i-th group below the head
    unfreezes), or when the evaluation metric has not improved for ``patience``
    evaluations (``on="plateau"``). ``history`` records ``(epoch, step, group)`` per unfreeze.
    """

    def __init__(
        self, model: nn.Module, groups: LayerGroups, *, every: int = 1, schedule: Sequence[int] | None = None,
        on: str = "epoch", metric: str = "loss", mode: str = "min", patience: int = 1,
    ):
        if on not in ("epoch", "plateau"):
            raise ValueError(f"unfreeze_on must be 'epoch' or 'plateau', got {on!r}")
        if every < 1:
            raise ValueError(f"unfreeze_every must be >= 1, got {every}")
        below_head = list(reversed(groups.names[:-1]))  # top layer first, embeddings last
        if schedule is not None:
            schedule = list(schedule)
            if len(schedule) > len(below_head):
                raise ValueError(
                    f"unfreeze_schedule has {len(schedule)} entries but the model has only {len(below_head)} layer "
                    f"groups below the head ({', '.join(below_head)})"
                )
            if any(b <= a for a, b in zip(schedule, schedule[1:])) or any(e < 1 for e in schedule):
                raise ValueError(f"unfreeze_schedule must be increasing epochs >= 1, got {schedule}")
        self.model, self.groups, self.order = model, groups, below_head
        self.every, self.schedule, self.on = every, schedule, on
        self.metric, self.mode, self.patience = metric, mode, patience
        self.unfrozen = 0  # groups below the head made trainable so far
        self.best: float | None = None
        self.bad = 0
        self.history: list[tuple[int, int, str]] = []

    def _freeze_to_current(self) -> None:
        trainable = {"head", *self.order[: self.unfrozen]}
        for group in self.groups.names:
            set_trainable(self.model, self.groups.params[group], group in trainable)

    def on_train_begin(self, state):
        self._freeze_to_current()

    def _unfreeze_next(self, state) -> None:
        if self.unfrozen < len(self.order):
            self.unfrozen += 1
            self._freeze_to_current()
            self.history.append((state.epoch, state.step, self.order[self.unfrozen - 1]))

    def on_epoch_end(self, state):
        if self.on != "epoch":
            return
        finished = state.epoch + 1  # epochs completed, counting this one
        if self.schedule is not None:
            while self.unfrozen < len(self.schedule) and self.schedule[self.unfrozen] <= finished:
                self._unfreeze_next(state)
        elif finished % self.every == 0:
            self._unfreeze_next(state)

    def on_evaluate(self, state, metrics):
        if self.on != "plateau":
            return
        value = float(metrics[self.metric])
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self._unfreeze_next(state)
                self.best, self.bad = None, 0

    def state_dict(self):
        return {"unfrozen": self.unfrozen, "best": self.best, "bad": self.bad, "history": self.history}

    def load_state_dict(self, state):
        self.unfrozen, self.best, self.bad = state["unfrozen"], state["best"], state["bad"]
        self.history = [tuple(h) for h in state["history"]]
        self._freeze_to_current()


# ------------------------------------------------------------------------ the plan


@dataclass
class StrategyPlan:
    """What ``apply_strategy`` decided: the model (possibly with new modules), its layer
    groups, callbacks to hand to the loop, and the names of parameters that must stay
    unchanged during training (``frozen``; empty for gradual unfreezing, whose set shrinks)."""

    model: nn.Module
    groups: LayerGroups
    callbacks: list[Callback] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    peft_method: str | None = None
    peft_options: dict = field(default_factory=dict)


STRATEGY_OPTIONS = {
    "full": (),
    "features": (),
    "freeze": ("freeze_first", "train_last", "extra_layers"),
    "gradual-unfreeze": ("unfreeze_every", "unfreeze_schedule", "unfreeze_on", "unfreeze_metric", "unfreeze_mode",
                         "unfreeze_patience"),
}


def check_strategy(strategy: str, options: dict, *, epochs: int | None = None) -> None:
    """Validate the strategy name and its options (before the model is touched)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in PEFT_STRATEGIES:
        return  # fastft.peft.apply validates its own options
    unknown = sorted(set(options) - set(STRATEGY_OPTIONS[strategy]))
    if unknown:
        raise TypeError(f"strategy {strategy!r} got unexpected option(s) {unknown}; valid: {list(STRATEGY_OPTIONS[strategy])}")
    if strategy == "freeze":
        given = [k for k in ("freeze_first", "train_last") if options.get(k) is not None]
        if len(given) != 1:
            raise ValueError("strategy 'freeze' needs exactly one of freeze_first=k or train_last=k")
        if options[given[0]] < 0:
            raise ValueError(f"{given[0]} must be >= 0, got {options[given[0]]}")
    if strategy == "gradual-unfreeze" and options.get("unfreeze_schedule") is not None and epochs is not None:
        last = max(options["unfreeze_schedule"], default=0)
        if last >= epochs:
            raise ValueError(
                f"unfreeze_schedule unfreezes after epoch {last} but the run has only {epochs} epoch(s)"
            )


def apply_strategy(model: nn.Module, strategy: str, options: dict | None = None, *, head_names=HEAD_NAMES,
                   epochs: int | None = None) -> StrategyPlan:
    """Set ``requires_grad`` (and add modules) on ``model`` for ``strategy``.

    Returns a ``StrategyPlan``. Raises ValueError / TypeError for an unknown strategy, an
    option of another strategy, ``freeze_first`` / ``train_last`` beyond the number of
    layers, an unfreeze schedule longer than the layer groups or than the run, ``features``
    on a model without a new head (e.g. a causal LM for SFT)."""
    options = dict(options or {})
    check_strategy(strategy, options, epochs=epochs)
    if strategy in PEFT_STRATEGIES:
        import fastft.peft

        fastft.peft.apply(model, strategy, **options)
        groups = layer_groups(model, head_names)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        return StrategyPlan(model, groups, frozen=frozen, peft_method=strategy, peft_options=options)

    if strategy == "freeze" and options.get("extra_layers"):
        add_head_layers(model, int(options["extra_layers"]), head_names)
    groups = layer_groups(model, head_names)
    num_layers = groups.num_layers
    for param in model.parameters():
        param.requires_grad_(True)
    callbacks: list[Callback] = []
    if strategy in ("features", "gradual-unfreeze") and not groups.params.get("head"):
        raise ValueError(
            f"strategy {strategy!r} trains a new task head first, but {type(model).__name__} has none "
            f"(no module named {list(head_names)})"
        )
    if strategy == "features":
        frozen_groups = [g for g in groups.names if g != "head"]
    elif strategy == "freeze":
        if options.get("freeze_first") is not None:
            k = int(options["freeze_first"])
            if k > num_layers:
                raise ValueError(f"freeze_first={k} but the model has only {num_layers} layers")
            frozen_groups = ["embeddings"] + [f"layer.{i}" for i in range(k)]
        else:
            k = int(options["train_last"])
            if k > num_layers:
                raise ValueError(f"train_last={k} but the model has only {num_layers} layers")
            frozen_groups = ["embeddings"] + [f"layer.{i}" for i in range(num_layers - k)]
    else:
        frozen_groups = []
    frozen = [n for g in frozen_groups if g in groups.params for n in groups.params[g]]
    set_trainable(model, frozen, False)
    if strategy == "gradual-unfreeze":
        callbacks.append(GradualUnfreezing(
            model, groups,
            every=int(options.get("unfreeze_every", 1)),
            schedule=options.get("unfreeze_schedule"),
            on=options.get("unfreeze_on", "epoch"),
            metric=options.get("unfreeze_metric", "loss"),
            mode=options.get("unfreeze_mode", "min"),
            patience=int(options.get("unfreeze_patience", 1)),
        ))
        callbacks[-1]._freeze_to_current()
    return StrategyPlan(model, groups, callbacks=callbacks, frozen=frozen)
