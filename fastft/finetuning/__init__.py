"""The fine-tuning domain: tasks, strategies, learning-rate schemes, forgetting guards,
metrics, evaluation on named sets, and the bundle. ``fastft.finetune`` (the recipe,
``fastft/recipes/finetune.py``) puts them together.

    from fastft.finetuning import ClassificationTask, Discriminative, EWC, Freeze, LoRA
    fastft.finetune(model, tokenizer, data, task=ClassificationTask(labels=["neg", "pos"]),
                    strategy=LoRA(rank=8), lr_scheme=Discriminative(), guard=EWC(strength=1.0),
                    pretraining_data=texts)

(The package is ``finetuning``, not ``finetune``: ``fastft.finetune`` is the function.)
"""

from fastft.finetuning.bundle import BUNDLE_FILE, load_finetuned, predict, save_finetuned
from fastft.finetuning.evaluation import evaluate_sets
from fastft.finetuning.guards import EWC, L2SP, Guard, Replay, lm_perplexity, lm_view
from fastft.finetuning.strategies import (
    Adapter,
    Discriminative,
    Features,
    Freeze,
    Full,
    GradualUnfreeze,
    LayerwiseDecay,
    LoRA,
    LRScheme,
    Prefix,
    Prompt,
    Strategy,
    layer_groups,
    lr_param_groups,
)
from fastft.finetuning.tasks import (
    TASKS,
    ClassificationTask,
    QuestionAnsweringTask,
    RegressionTask,
    SFTTask,
    Task,
    TokenClassificationTask,
    get_task,
)

__all__ = [
    "BUNDLE_FILE",
    "EWC",
    "L2SP",
    "TASKS",
    "Adapter",
    "ClassificationTask",
    "Discriminative",
    "Features",
    "Freeze",
    "Full",
    "GradualUnfreeze",
    "Guard",
    "LRScheme",
    "LayerwiseDecay",
    "LoRA",
    "Prefix",
    "Prompt",
    "QuestionAnsweringTask",
    "RegressionTask",
    "Replay",
    "SFTTask",
    "Strategy",
    "Task",
    "TokenClassificationTask",
    "evaluate_sets",
    "get_task",
    "layer_groups",
    "lm_perplexity",
    "lm_view",
    "load_finetuned",
    "lr_param_groups",
    "predict",
    "save_finetuned",
]
