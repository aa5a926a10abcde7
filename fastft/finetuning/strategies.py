"""Fine-tuning strategies: which parameters train, at which learning rate, and when.

Each strategy is a typed option (``fastft.train.config.Option``); a string names one with
its defaults (``strategy="lora"``), YAML gives ``{name: lora, rank: 8}``:

    Full()                    every parameter trains
    Features()                frozen backbone: only the new task head trains (feature extraction)
    Freeze(first=k)           the embeddings and the first k layers are frozen;
    Freeze(train_last=k)      ... or all but the last k layers; ``extra_layers=n`` adds n new
                              hidden layers to the head
    GradualUnfreeze(every=1)  ULMFiT (Howard & Ruder 2018, §3.3): start with the head only, unfreeze
                              one more layer group from the top every ``every`` epochs, at the
                              epochs of ``schedule``, or on a plateau of the evaluation metric
                              (``on="plateau"``), until everything trains
    LoRA(rank=8) / Adapter() / Prefix() / Prompt()   ``fastft.peft.apply(model, method, **options)``
                              (options left at None take fastft.peft's defaults)

Layer groups, bottom to top: ``embeddings``, ``layer.0`` ... ``layer.{L-1}`` (modules after
the last layer, e.g. BERT's pooler or a final norm, join the top layer's group), ``head``
(the freshly initialised task head: ``classifier`` / ``qa_outputs`` / ``score``).

Learning rates per group (``lr_scheme=``), also typed options:

    Discriminative(factor=2.6)   ULMFiT §3.2: the head at ``lr``, each lower group at the rate of
                                 the group above ÷ ``factor``
    LayerwiseDecay(factor=0.8)   ELECTRA's layer-wise decay (Clark et al. 2020, App. A): the group
                                 at depth d below the head gets ``lr · factor^d``

Frozen parameters stay in the optimizer with ``requires_grad=False``: they get no gradient,
so AdamW skips them entirely (no weight decay either) and they stay bitwise unchanged;
unfreezing one later needs no new optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from torch import nn

from fastft.train.callbacks import Callback
from fastft.train.config import Option

__all__ = [
    "HEAD_NAMES",
    "LRScheme",
    "Adapter",
    "Discriminative",
    "Features",
    "Freeze",
    "Full",
    "GradualUnfreeze",
    "GradualUnfreezing",
    "LayerGroups",
    "LayerwiseDecay",
    "LoRA",
    "Prefix",
    "Prompt",
    "Strategy",
    "StrategyPlan",
    "add_head_layers",
    "layer_groups",
    "lr_param_groups",
]

HEAD_NAMES = ("classifier", "qa_outputs", "score")


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


class LRScheme(Option):
    """How the learning rate changes with depth below the head (depth 0 = the head)."""

    kind: ClassVar[str] = "lr_scheme"

    def group_lr(self, lr: float, depth: int) -> float:
        raise NotImplementedError


@dataclass
class Discriminative(LRScheme):
    """ULMFiT's discriminative fine-tuning (§3.2): ``lr / factor**depth``."""

    name: ClassVar[str] = "discriminative"
    factor: float = 2.6

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"discriminative: factor must be > 0, got {self.factor}")

    def group_lr(self, lr, depth):
        return lr / self.factor**depth


@dataclass
class LayerwiseDecay(LRScheme):
    """ELECTRA's layer-wise learning-rate decay: ``lr * factor**depth``."""

    name: ClassVar[str] = "layerwise"
    factor: float = 0.8

    def __post_init__(self):
        if not 0 < self.factor <= 1:
            raise ValueError(f"layerwise: factor must be in (0, 1], got {self.factor}")

    def group_lr(self, lr, depth):
        return lr * self.factor**depth


def lr_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    scheme: LRScheme | str | None = None,
    *,
    groups: LayerGroups | None = None,
) -> list[dict]:
    """Torch optimizer parameter groups with per-layer-group learning rates.

    ``scheme=None``: every group at ``lr``; else the scheme's rate for the group's depth
    below the head (the head has depth 0). Each layer group is split into decayed
    (matrices) and non-decayed (biases, norm scales) parts. *All* parameters are included,
    frozen ones too (see the module docstring). Each dict carries ``"name"``
    (``"layer.3/decay"``) for inspection.
    """
    scheme = LRScheme.parse(scheme)
    groups = groups or layer_groups(model)
    named = dict(model.named_parameters())
    result = []
    top_to_bottom = list(reversed(groups.names))
    for depth, group in enumerate(top_to_bottom):
        group_lr = lr if scheme is None else scheme.group_lr(lr, depth)
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
            raise ValueError(f"gradual-unfreeze: on must be 'epoch' or 'plateau', got {on!r}")
        if every < 1:
            raise ValueError(f"gradual-unfreeze: every must be >= 1, got {every}")
        below_head = list(reversed(groups.names[:-1]))  # top layer first, embeddings last
        if schedule is not None:
            schedule = list(schedule)
            if len(schedule) > len(below_head):
                raise ValueError(
                    f"gradual-unfreeze: schedule has {len(schedule)} entries but the model has only {len(below_head)} layer "
                    f"groups below the head ({', '.join(below_head)})"
                )
            if any(b <= a for a, b in zip(schedule, schedule[1:])) or any(e < 1 for e in schedule):
                raise ValueError(f"gradual-unfreeze: schedule must be increasing epochs >= 1, got {schedule}")
        self.model, self.groups, self.order = model, groups, below_head
        self.every, self.schedule, self.on = every, schedule, on
        self.metric, self.mode, self.patience = metric, mode, patience
        self.unfrozen = 0  # groups below the head made trainable so far
        self.best: float | None = None
        self.bad = 0
        self.history: list[tuple[int, int, str]] = []

    def freeze_to_current(self) -> None:
        trainable = {"head", *self.order[: self.unfrozen]}
        for group in self.groups.names:
            set_trainable(self.model, self.groups.params[group], group in trainable)

    def on_train_begin(self, state):
        self.freeze_to_current()

    def _unfreeze_next(self, state) -> None:
        if self.unfrozen < len(self.order):
            self.unfrozen += 1
            self.freeze_to_current()
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
        self.freeze_to_current()


# ------------------------------------------------------------------------ strategies


@dataclass
class StrategyPlan:
    """What ``Strategy.apply`` did: the model's layer groups, callbacks to hand to the loop,
    and the names of parameters that must stay unchanged during training (``frozen``;
    empty for gradual unfreezing, whose set shrinks)."""

    groups: LayerGroups
    callbacks: list[Callback] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


class Strategy(Option):
    """Which parameters of a model with a task head train, and when."""

    kind: ClassVar[str] = "strategy"

    peft_method: ClassVar[str | None] = None  # the fastft.peft method a PEFT strategy applies
    trains_new_head_first: ClassVar[bool] = False  # needs a freshly initialised task head

    def check(self, epochs: int | None) -> None:
        """Refuse options that cannot fit a run of ``epochs`` epochs (None: step-based)."""

    def apply(self, model: nn.Module, *, head_names: Sequence[str] = HEAD_NAMES, epochs: int | None = None,
              tokenizer=None) -> StrategyPlan:
        """Add the strategy's modules and set ``requires_grad`` on ``model``, in place.

        Raises:
            ValueError: options that do not fit the model (freezing more layers than it
                has, a schedule longer than its layer groups or the run), or a strategy
                that trains a new head first on a model without one (a causal LM for SFT).
        """
        self.check(epochs)
        self.add_modules(model, head_names=head_names, tokenizer=tokenizer)
        groups = layer_groups(model, head_names)
        if self.trains_new_head_first and not groups.params.get("head"):
            raise ValueError(f"strategy {self.name!r} trains a new task head first, but {type(model).__name__} has none "
                             f"(no module named {list(head_names)})")
        frozen = self.freeze(model, groups)
        return StrategyPlan(groups, callbacks=self._callbacks(model, groups), frozen=frozen)

    def add_modules(self, model: nn.Module, *, head_names: Sequence[str] = HEAD_NAMES, tokenizer=None) -> None:
        """The new modules this strategy trains -- also what ``load_finetuned`` rebuilds
        before it loads a bundle's weights."""

    def freeze(self, model: nn.Module, groups: LayerGroups) -> list[str]:
        """Make everything trainable except the frozen groups; returns the frozen names."""
        for param in model.parameters():
            param.requires_grad_(True)
        frozen = [n for g in self._frozen_groups(groups) if g in groups.params for n in groups.params[g]]
        set_trainable(model, frozen, False)
        return frozen

    def _frozen_groups(self, groups: LayerGroups) -> list[str]:
        return []

    def _callbacks(self, model, groups: LayerGroups) -> list[Callback]:
        return []


@dataclass
class Full(Strategy):
    name: ClassVar[str] = "full"


@dataclass
class Features(Strategy):
    """Feature extraction: only the new task head trains."""

    name: ClassVar[str] = "features"
    trains_new_head_first: ClassVar[bool] = True

    def _frozen_groups(self, groups):
        return [g for g in groups.names if g != "head"]


@dataclass
class Freeze(Strategy):
    """``first=k``: freeze the embeddings and the first k layers; ``train_last=k``: freeze
    all but the last k layers; ``extra_layers=n``: n new hidden layers in the head."""

    name: ClassVar[str] = "freeze"
    first: int | None = None
    train_last: int | None = None
    extra_layers: int = 0

    def __post_init__(self):
        given = [k for k in ("first", "train_last") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("strategy 'freeze' needs exactly one of first=k or train_last=k")
        if getattr(self, given[0]) < 0 or self.extra_layers < 0:
            raise ValueError(f"freeze: {given[0]} and extra_layers must be >= 0, got {self}")

    def add_modules(self, model, *, head_names=HEAD_NAMES, tokenizer=None):
        if self.extra_layers:
            add_head_layers(model, int(self.extra_layers), head_names)

    def _frozen_groups(self, groups):
        layers = groups.num_layers
        k = self.first if self.first is not None else self.train_last
        if k > layers:
            raise ValueError(f"{'first' if self.first is not None else 'train_last'}={k} but the model has only "
                             f"{layers} layers")
        frozen_layers = k if self.first is not None else layers - k
        return ["embeddings"] + [f"layer.{i}" for i in range(frozen_layers)]


@dataclass
class GradualUnfreeze(Strategy):
    """ULMFiT's gradual unfreezing; see ``GradualUnfreezing`` for the options."""

    name: ClassVar[str] = "gradual-unfreeze"
    trains_new_head_first: ClassVar[bool] = True
    every: int = 1
    schedule: list[int] | None = None
    on: str = "epoch"
    metric: str = "loss"
    mode: str = "min"
    patience: int = 1

    def check(self, epochs):
        if self.schedule is not None and epochs is not None and max(self.schedule, default=0) >= epochs:
            raise ValueError(f"gradual-unfreeze: schedule unfreezes after epoch {max(self.schedule)} but the run has "
                             f"only {epochs} epoch(s)")

    def _callbacks(self, model, groups):
        unfreezing = GradualUnfreezing(model, groups, every=int(self.every), schedule=self.schedule, on=self.on,
                                       metric=self.metric, mode=self.mode, patience=int(self.patience))
        unfreezing.freeze_to_current()
        return [unfreezing]


class PEFTStrategy(Strategy):
    """A ``fastft.peft`` method; options left at None take ``fastft.peft.apply``'s defaults."""

    def peft_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options().items() if v is not None}

    def add_modules(self, model, *, head_names=HEAD_NAMES, tokenizer=None):
        import fastft.peft

        options = self.peft_options()
        if options.get("init_text") is not None:  # a prompt initialised from text needs the tokenizer
            options["tokenizer"] = tokenizer
        fastft.peft.apply(model, self.peft_method, **options)

    def freeze(self, model, groups):
        return [n for n, p in model.named_parameters() if not p.requires_grad]  # fastft.peft froze the rest


@dataclass
class LoRA(PEFTStrategy):
    name: ClassVar[str] = "lora"
    peft_method: ClassVar[str] = "lora"
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: Any = None
    rslora: bool | None = None
    modules_to_save: Any = None


@dataclass
class Adapter(PEFTStrategy):
    name: ClassVar[str] = "adapter"
    peft_method: ClassVar[str] = "adapter"
    bottleneck_size: int | None = None
    activation: str | None = None
    up_init_std: float | None = None
    adapter_modules: Any = None
    modules_to_save: Any = None


@dataclass
class Prefix(PEFTStrategy):
    name: ClassVar[str] = "prefix"
    peft_method: ClassVar[str] = "prefix"
    num_virtual_tokens: int | None = None
    prefix_projection: bool | None = None
    projection_hidden_size: int | None = None
    modules_to_save: Any = None


@dataclass
class Prompt(PEFTStrategy):
    name: ClassVar[str] = "prompt"
    peft_method: ClassVar[str] = "prompt"
    num_virtual_tokens: int | None = None
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    modules_to_save: Any = None
