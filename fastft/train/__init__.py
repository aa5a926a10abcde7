"""Training: one loop (``loop.py``) shared by pretraining and fine-tuning.

    import fastft
    state = fastft.pretrain(model, tokenizer, "corpus.txt", objective="mlm", max_steps=1000)
    metrics = fastft.evaluate(state.model, "held_out.txt", "mlm", tokenizer=tokenizer)

Fine-tuning builds on ``train`` with its own ``Objective``, ``param_groups``, callbacks
and ``extra_losses``; schedules register in ``SCHEDULES``.
"""

from fastft.train.callbacks import Callback, EarlyStopping
from fastft.train.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from fastft.train.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from fastft.train import strategies  # noqa: F401  (registers the "slanted_triangular" schedule)
from fastft.train.distributed import Parallel, setup_parallel, trainable_state_dict
from fastft.train.finetune import FinetuneResult, evaluate_sets, finetune, load_finetuned, predict, save_finetuned
from fastft.train.loop import TrainState, accumulate_gradients, build_optimizer, evaluate, train
from fastft.train.objectives import CausalLM, MaskedLM, MaskedLMWithNSP, Objective, get_objective, model_inputs
from fastft.train.pretrain import pretrain
from fastft.train.schedules import SCHEDULES, build_scheduler, register_schedule

__all__ = [
    "SCHEDULES",
    "Callback",
    "CausalLM",
    "DataConfig",
    "EarlyStopping",
    "FinetuneResult",
    "MaskedLM",
    "MaskedLMWithNSP",
    "ModelConfig",
    "Objective",
    "OptimConfig",
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
    "evaluate",
    "evaluate_sets",
    "export_pretrained",
    "finetune",
    "get_objective",
    "latest_checkpoint",
    "load_finetuned",
    "load_checkpoint",
    "load_config",
    "model_inputs",
    "pretrain",
    "predict",
    "register_schedule",
    "save_checkpoint",
    "save_finetuned",
    "setup_parallel",
    "train",
    "trainable_state_dict",
]
