"""The training engine: one loop (``loop.py``) that every recipe (pretraining,
fine-tuning, ...) drives, and what it is made of.

    from fastft.train import TrainConfig, train, evaluate
    state = train(model, "mlm", tokenised_blocks, collator=collator, config=TrainConfig(max_steps=100))
    metrics = evaluate(state.model, "held_out.txt", "mlm", tokenizer=tokenizer)

The engine knows no task: objectives, callbacks, parameter groups and extra losses come
in from the caller (``fastft.finetuning`` supplies the fine-tuning ones). Schedules
register in ``SCHEDULES``. The one-call entry points (``fastft.pretrain``,
``fastft.finetune``) live in ``fastft.recipes``.
"""

from fastft.train.callbacks import BestModel, Callback, EarlyStopping
from fastft.train.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from fastft.train.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    Option,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_config,
)
from fastft.train.distributed import Parallel, setup_parallel, trainable_state_dict
from fastft.train.evaluation import evaluate
from fastft.train.loop import TrainState, accumulate_gradients, train
from fastft.train.objectives import CausalLM, MaskedLM, MaskedLMWithNSP, Objective, get_objective, model_inputs
from fastft.train.optim import build_optimizer
from fastft.train.runtime import cpu_speedups, resolve_device, seed_everything
from fastft.train.schedules import SCHEDULES, build_scheduler, register_schedule

__all__ = [
    "SCHEDULES",
    "BestModel",
    "Callback",
    "CausalLM",
    "DataConfig",
    "EarlyStopping",
    "MaskedLM",
    "MaskedLMWithNSP",
    "ModelConfig",
    "Objective",
    "OptimConfig",
    "Option",
    "Parallel",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainState",
    "accumulate_gradients",
    "apply_overrides",
    "build_optimizer",
    "build_scheduler",
    "config_from_dict",
    "cpu_speedups",
    "evaluate",
    "export_pretrained",
    "get_objective",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "model_inputs",
    "register_schedule",
    "resolve_config",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "setup_parallel",
    "train",
    "trainable_state_dict",
]
