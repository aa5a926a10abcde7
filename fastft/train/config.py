"""Run configuration: dataclasses, YAML files and ``key=value`` overrides.

    run.yaml                              command line
    --------                              ------------
    output_dir: runs/bert-tiny            fastft pretrain --config run.yaml \\
    objective: mlm                            optim.lr=3e-4 data.block_size=64 max_steps=100
    max_steps: 1000
    optim: {lr: 5.0e-4}
    data: {train: corpus.txt, block_size: 128}
    model: {name_or_path: bert-base-uncased, from_scratch: true,
            config_overrides: {num_hidden_layers: 4}}

Nested keys are joined with dots; values are parsed as YAML scalars (``3e-4`` -> float,
``true`` -> bool, ``null`` -> None, ``[1, 2]`` -> list). Unknown keys raise ``KeyError``
naming the valid ones. Python callers can pass overrides as keyword arguments:
``optim__lr=3e-4`` (double underscore for a dot), or just ``lr=3e-4`` when the field name
is unique across the sections.

Typed options (``option_field``: a fine-tuning strategy, guard, learning-rate scheme, task)
take a name, a mapping with a name, or the object: ``strategy: lora``,
``strategy: {name: lora, rank: 8}``, ``strategy.rank=16`` on the command line,
``strategy=LoRA(rank=8)`` from Python.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import yaml

__all__ = [
    "DataConfig",
    "ModelConfig",
    "Option",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_as_dict",
    "config_from_dict",
    "load_config",
    "option_field",
    "resolve_config",
    "run_record",
]

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
FSDP_DTYPES = (None, "fp32", "bf16", "fp16")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where ``3e-4`` (no dot) is a *string*; YAML 1.2 and every
    user mean a float. This loader adds the 1.2 float pattern."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """``yaml.safe_load`` with YAML 1.2 floats (``3e-4`` -> 0.0003)."""
    return yaml.load(text, Loader=_YamlLoader)
class Option:
    """Base of a family of typed options chosen by name: fine-tuning strategies, forgetting
    guards, learning-rate schemes. A family is a direct subclass; its members are
    dataclasses with a ``name`` and their own fields, e.g. ``LoRA(rank=8)``.

    ``Family.parse(value)`` accepts a member, its name (``"lora"``: the defaults), or a
    mapping ``{"name": "lora", "rank": 8}`` -- what YAML files and ``key=value``
    overrides give; a mapping without ``name`` updates ``current`` (``{rank: 16}``).
    ``spec()`` is the inverse, for ``run_config.json``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "option"  # the family's name in messages ("strategy", "guard" ...)
    members: ClassVar[dict[str, type]]  # name -> class, one registry per family

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if Option in cls.__bases__:  # a new family
            cls.members = {}
        elif cls.__dict__.get("name"):
            cls.members[cls.name] = cls

    @classmethod
    def parse(cls, value, current: "Option | None" = None) -> "Option | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping):
            raise TypeError(f"{cls.kind}: give a name, a mapping with a name, or a {cls.__name__}, got {value!r}")
        options = dict(value)
        name = options.pop("name", None)
        if name is None:
            if current is None:
                raise ValueError(f"{cls.kind} {dict(value)!r}: which one? add name: one of {sorted(cls.members)}")
            name, options = current.name, {**current.options(), **options}
        if name not in cls.members:
            raise ValueError(f"unknown {cls.kind} {name!r}; choose one of {sorted(cls.members)}")
        member = cls.members[name]
        valid = [f.name for f in dataclasses.fields(member)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{cls.kind} {name!r} got unexpected option(s) {unknown}; valid: {valid}")
        return member(**options)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.options()}


def option_field(parse, default: Any):
    """A config field holding a typed option: ``parse`` is an ``Option`` family (or any
    ``fn(value, current=None) -> object``) turning names / mappings into the object;
    ``default``: what it parses to when the config does not set the field."""
    parse = getattr(parse, "parse", parse)
    return field(default_factory=lambda: parse(default), metadata={"parse": parse})


def _parser(cls, name: str):
    """The ``parse`` function of an ``option_field`` named ``name`` of dataclass ``cls``, or None."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("parse")
    return None


@dataclass
class DataConfig:
    """Where the text is and how it becomes batches (``fastft.data``)."""

    train: Any = None  # path(s) / glob / Hub name of the training documents
    validation: Any = None  # the same for held-out documents
    validation_fraction: float = 0.0  # when no validation set: hold out this share of train
    text_column: str = "text"
    txt_mode: str = "line"  # "line": a document per line; "paragraph": blank-line separated
    split: str = "train"  # split of a Hub dataset
    block_size: int = 128  # tokens per packed block / maximum length when padding
    packing: bool = True  # True: fixed blocks with document boundaries; False: pad per batch
    reset_position_ids: bool = False  # packed blocks: positions restart at each document
    num_proc: int | None = None  # worker processes for tokenising
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    nsp_probability: float = 0.5

    def lm_options(self) -> dict[str, Any]:
        """The keyword arguments of ``fastft.data.prepare_lm_data`` this section sets."""
        where = ("train", "validation", "validation_fraction")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in where}


@dataclass
class OptimConfig:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""

    lr: float = 5e-4
    weight_decay: float = 0.01  # not applied to biases and normalisation weights
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: Any = "auto"  # "auto": fused kernel on CUDA and for plain CPU tensors; True / False to force
    max_grad_norm: float | None = 1.0  # None or 0: no clipping


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier per optimizer step (``fastft.train.schedules``)."""

    name: str = "linear"  # a key of fastft.train.schedules.SCHEDULES
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: share of the total steps
    min_lr_ratio: float = 0.0  # floor of the decay, as a share of the peak
    options: dict = field(default_factory=dict)  # extra arguments of custom schedules


@dataclass
class ModelConfig:
    """Which model to build (used by the CLI and when ``pretrain`` gets a name)."""

    name_or_path: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    from_scratch: bool = False  # True: random weights from the model's config
    config_overrides: dict = field(default_factory=dict)  # e.g. {num_hidden_layers: 2}


@dataclass
class ParallelConfig:
    """Options of the ``distributed`` modes (``fastft.train.distributed``); launch with
    ``torchrun --nproc_per_node N -m fastft pretrain ... distributed=ddp|fsdp``."""

    timeout_s: float = 600.0  # a collective waiting longer than this on a rank fails the job
    find_unused_parameters: bool = False  # DDP: models whose forward skips some trainable weights
    cpu_offload: bool = False  # FSDP: keep sharded weights, gradients, optimizer state on the CPU
    param_dtype: str | None = None  # FSDP: compute dtype of the gathered weights ("bf16" ...); None: as stored
    reduce_dtype: str | None = None  # FSDP: gradient reduce-scatter dtype; None: param_dtype
    reshard_after_forward: bool = True  # FSDP: free gathered weights after forward (ZeRO-3); False: ZeRO-2-like


@dataclass
class TrainConfig:
    """What the training loop needs, whatever the recipe. Steps are optimizer steps; a
    batch is a micro-batch. Recipes extend it with their own fields
    (``fastft.recipes.pretrain.PretrainConfig``: objective, data, model;
    ``fastft.recipes.finetune.FinetuneConfig``: task, strategy, guard ...)."""

    output_dir: str = "runs/fastft"
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available else cpu
    batch_size: int = 8  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # None: run `epochs` epochs
    epochs: int = 1
    # "fp32" | "bf16" (autocast) | "fp16" (autocast + GradScaler; GPUs only) | "auto" (bf16 on a GPU
    # with bf16 and on a CPU with native bf16 -- AMX / AVX512-BF16 --, else fp32; train/runtime.py)
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    fused: bool = True  # apply fastft.patch (fused attention / loss kernels)
    # CPU runs only: nn.Dropout draws its masks from a faster generator (fastft/nn/dropout.py),
    # and (Linux/glibc) malloc keeps large freed buffers instead of re-mapping them each step.
    fast_dropout: bool = True
    retain_freed_memory: bool = True
    eval_every: int = 0  # optimizer steps between evaluations; 0: at each epoch end
    eval_batches: int | None = None  # None: the whole held-out set
    eval_batch_size: int | None = None  # None: batch_size
    early_stopping_patience: int | None = None  # evaluations without improvement
    early_stopping_metric: str = "loss"  # lower is better
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2  # this run's checkpoints kept on disk
    resume: Any = None  # None | "auto" (latest in output_dir if any) | a checkpoint path
    # An output_dir holding another run is refused unless resume is set, or overwrite:
    # then the old run is moved aside to <output_dir>.previous-<date-time>, never deleted.
    overwrite: bool = False
    log_every: int = 10  # optimizer steps between metrics.jsonl lines (each the mean over them)
    progress: bool = True  # tqdm bar
    plot: bool = True  # loss / perplexity curve PNG at the end
    export: bool = True  # save_pretrained + tokenizer into output_dir/final
    # Data parallelism under torchrun: "ddp" (model fits one device), "fsdp" (FSDP2
    # fully_shard per transformer block), "none", or "auto" (ddp when WORLD_SIZE > 1).
    distributed: str = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self.parallel, name) not in FSDP_DTYPES:
                raise ValueError(f"parallel.{name} must be one of {FSDP_DTYPES}, got {getattr(self.parallel, name)!r}")
        if self.parallel.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.parallel.timeout_s}")
        for name in ("batch_size", "grad_accum_steps", "epochs", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")


def _valid_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, default: Any) -> Any:
    """Light type fixing for values coming from YAML (``1`` for a float field, lists for tuples)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def config_from_dict(cls, values: Mapping[str, Any] | None, *, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) mapping.

    Raises:
        KeyError: a key that is not a field, with the list of valid keys.
        TypeError: a mapping given for a non-dataclass field that is not a dict field,
            or a scalar given for a section.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KeyError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {[prefix + k for k in fields]}")
    defaults = cls()
    kwargs = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        parse = _parser(cls, name)
        if parse is not None:
            kwargs[name] = parse(value)
        elif dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise TypeError(f"config key {prefix + name!r} is a section: give a mapping, got {value!r}")
            kwargs[name] = config_from_dict(type(default), value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, default)
    return cls(**kwargs)


def _set_dotted(config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = config
    for depth, part in enumerate(parts):
        valid = _valid_keys(type(target))
        if part not in valid:
            where = ".".join(parts[:depth])
            raise KeyError(f"unknown config key {dotted!r}; valid keys{' under ' + where if where else ''}: {valid}")
        if depth == len(parts) - 1:
            default = getattr(target, part)
            parse = _parser(type(target), part)
            if parse is not None:
                setattr(target, part, parse(value, current=default))
                return
            if dataclasses.is_dataclass(default):
                if not isinstance(value, Mapping):
                    raise TypeError(f"config key {dotted!r} is a section: give a mapping, got {value!r}")
                value = config_from_dict(type(default), {**dataclasses.asdict(default), **value}, prefix=dotted + ".")
            setattr(target, part, _coerce(value, default))
        else:
            parse = _parser(type(target), part)
            if parse is not None:  # strategy.rank=16: a new option object with that field changed
                rest = ".".join(parts[depth + 1 :])
                setattr(target, part, parse({rest: value}, current=getattr(target, part)))
                return
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise KeyError(f"config key {'.'.join(parts[: depth + 1])!r} is not a section")


def _copy_sections(config):
    """A copy of ``config`` with its own sections (nested configs) and option objects;
    other values (data, models given from Python) are shared, not copied."""
    copies = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            copies[f.name] = _copy_sections(value)
    return dataclasses.replace(config, **copies)


def config_as_dict(config) -> dict[str, Any]:
    """``config`` as plain data (option objects as their ``spec()``), for ``run_config.json``."""
    result = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "spec") and _parser(type(config), f.name) is not None:
            value = value.spec()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = config_as_dict(value)
        result[f.name] = value
    return result


def run_record(config) -> dict[str, Any]:
    """What ``run_config.json`` holds: ``config`` as plain data (options as their specs;
    data given as Python lists or objects described, not dumped) and the versions it ran
    with. ``load_config`` reads it back (the versions are ignored), so a run can be redone."""
    import platform

    import torch

    from fastft import __version__

    record = _describe(config_as_dict(config))
    versions = {"fastft": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "triton", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {**record, "versions": versions}


def _describe(value: Any) -> Any:
    """JSON-able ``value``; long lists and other objects (texts, models) by a short description."""
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value] if len(value) <= 20 else f"<{len(value)} items given from Python>"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__name__} given from Python>"


def apply_overrides(config: TrainConfig, overrides: list[str] | Mapping[str, Any]) -> TrainConfig:
    """Apply ``["optim.lr=3e-4", ...]`` (values parsed as YAML; a field name unique across
    the sections may stand alone: ``lr=3e-4``) or ``{"optim.lr": 3e-4}``.

    Returns a new config (the argument is not modified); checks run again afterwards.

    Raises:
        ValueError: an item without ``=``.
        KeyError: an unknown key, naming the valid ones.
    """
    config = _copy_sections(config)
    if not isinstance(overrides, Mapping):
        parsed = {}
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} is not key=value")
            parsed[key.strip()] = parse_yaml(text) if text.strip() else None
        overrides = resolve_kwarg_overrides(config, parsed)  # `lr=3e-4` as in Python: the one field of that name
    for key, value in overrides.items():
        _set_dotted(config, key, value)
    config.__post_init__()
    return config


def load_config(path: str | None = None, overrides: list[str] | Mapping[str, Any] = (), *, cls: type | None = None):
    """Read a YAML file into ``cls`` (default ``TrainConfig``; defaults when ``path`` is
    None), then apply overrides.

    Raises:
        KeyError: unknown keys (in the file or the overrides), naming the valid ones.
        TypeError: the file's top level is not a mapping.
    """
    values = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path}: no such file")
        with open(path) as f:
            values = parse_yaml(f.read()) or {}
        if not isinstance(values, Mapping):
            raise TypeError(f"{path}: the top level must be a mapping of config keys")
        values = {k: v for k, v in values.items() if k != "versions"}  # a run_config.json: what it ran with
    return apply_overrides(config_from_dict(cls or TrainConfig, values), overrides)


def resolve_kwarg_overrides(config: TrainConfig, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Map Python keyword overrides to dotted keys: ``optim__lr`` -> ``optim.lr``;
    ``lr`` -> ``optim.lr`` when ``lr`` names exactly one field across the sections.

    Raises:
        KeyError: a name found nowhere or in several sections.
    """
    sections = {f.name for f in dataclasses.fields(config)
                if dataclasses.is_dataclass(getattr(config, f.name)) and "parse" not in f.metadata}
    dotted = {}
    for key, value in kwargs.items():
        key = key.replace("__", ".")
        top = key.split(".")[0]
        if "." in key or (top in _valid_keys(type(config))):
            dotted[key] = value
            continue
        owners = [s for s in sorted(sections) if key in _valid_keys(type(getattr(config, s)))]
        if len(owners) != 1:
            valid = _valid_keys(type(config)) + [f"{s}.{k}" for s in sorted(sections) for k in _valid_keys(type(getattr(config, s)))]
            why = "is ambiguous between " + str(owners) if owners else "is unknown"
            raise KeyError(f"config key {key!r} {why}; valid keys: {valid}")
        dotted[f"{owners[0]}.{key}"] = value
    return dotted


def resolve_config(config, overrides: Mapping[str, Any], cls: type | None = None):
    """A config of dataclass ``cls`` (default ``TrainConfig``) from a config object, a
    mapping, a YAML path or None, plus Python keyword overrides (``lr=...``,
    ``optim__lr=...``, ``data={"block_size": 64}``).

    Raises:
        TypeError: ``config`` of another kind.
        KeyError: unknown keys, naming the valid ones.
    """
    cls = cls or TrainConfig
    if config is None:
        config = cls()
    elif isinstance(config, str):
        config = load_config(config, cls=cls)
    elif isinstance(config, Mapping):
        config = config_from_dict(cls, config)
    elif not isinstance(config, cls):
        if isinstance(config, TrainConfig):  # a plain TrainConfig where a richer one is expected: keep its values
            config = config_from_dict(cls, dataclasses.asdict(config))
        else:
            raise TypeError(f"config must be a {cls.__name__}, a mapping, a YAML path or None, got {type(config).__name__}")
    return apply_overrides(config, resolve_kwarg_overrides(config, overrides or {}))  # a copy: callers may set fields
