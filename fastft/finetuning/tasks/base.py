"""Fine-tuning tasks: what the data must look like, how it becomes features, which model
head it needs, what the loop minimises, and how it is scored.

    task           columns                                   model head (transformers)
    -------------  ----------------------------------------  ---------------------------------
    classification text [, text_pair], label                  *ForSequenceClassification ([CLS])
    regression     text [, text_pair], label (float)          *ForSequenceClassification, 1 output
    token          tokens (list of words), tags (list)        *ForTokenClassification
    qa             question, context, answers                 *ForQuestionAnswering (span head)
                   ({"text": [...], "answer_start": [...]})
    sft            prompt, response                           *ForCausalLM / *LMHeadModel

Every task turns rows (dicts) into features with ``preprocess``, batches them with its
collator, trains through an ``Objective`` (summed losses + counts, see
``fastft.train.objectives``) and reports ``metric_fns`` during evaluation. The
``check_*`` hooks examine data and model *before* any training starts, with a message
naming what is wrong. One file per task; ``get_task`` (``fastft.finetuning.tasks``)
builds one from its name.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from fastft.data.collators import PadCollator, pad_id_of
from fastft.train.objectives import Objective

__all__ = ["Task", "distinct_labels", "forward_names", "label_name"]


def forward_names(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class Task:
    """Base class. Subclasses set the class attributes and implement the hooks."""

    name = "task"
    auto_class = "AutoModel"  # the transformers Auto* class that builds the right head
    required_columns: tuple[str, ...] = ()
    primary_metric = "loss"
    # Metrics where higher is better; every other one (the loss among them) is better lower.
    # Best-model selection, early stopping and reports take the direction from here.
    higher_is_better: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ("classifier", "qa_outputs", "score")  # freshly initialised heads
    pretraining_objective = "mlm"  # objective of the backbone's pretraining (forgetting, guards)

    def __init__(self, *, max_length: int = 128, labels: Sequence[Any] | None = None, **options):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        self.max_length = max_length
        self.labels = list(labels) if labels is not None else None
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise TypeError(
                f"task {self.name!r} got unexpected option(s) {unknown}; valid: max_length, labels, {self.option_names()}"
            )
        self.options = options

    def spec(self) -> dict[str, Any]:
        """Name and options: what ``get_task`` rebuilds this task from (run records, bundles)."""
        return {"name": self.name, "max_length": self.max_length, "labels": self.labels, **self.options}

    def mode(self, metric: str) -> str:
        """``"max"`` when a higher ``metric`` is better for this task, else ``"min"``."""
        return "max" if metric in self.higher_is_better else "min"

    def option_names(self) -> tuple[str, ...]:
        return ()

    # --- checks before training ------------------------------------------------------
    def check_columns(self, rows: list[dict], set_name: str) -> None:
        if not rows:
            raise ValueError(f"data[{set_name!r}] is empty")
        missing = [c for c in self.required_columns if c not in rows[0]]
        if missing:
            raise ValueError(
                f"task {self.name!r} needs columns {list(self.required_columns)}; data[{set_name!r}] lacks {missing} "
                f"(it has {sorted(rows[0])})"
            )

    def fit_labels(self, train_rows: list[dict]) -> None:
        """Fix the label map from the training rows when none was configured."""

    def check_labels(self, rows: list[dict], set_name: str) -> None:
        pass

    def check_model(self, model) -> None:
        pass

    def model_kwargs(self) -> dict:
        """Arguments for ``Auto*.from_pretrained`` (label map, number of labels)."""
        return {}

    def build_model(self, name_or_path: str):
        import transformers

        return getattr(transformers, self.auto_class).from_pretrained(name_or_path, **self.model_kwargs())

    # --- data ------------------------------------------------------------------------
    def preprocess(self, rows: list[dict], tokenizer, *, training: bool) -> list[dict]:
        raise NotImplementedError

    def collator(self, tokenizer):
        return PadCollator(pad_id_of(tokenizer))

    def objective(self) -> Objective:
        raise NotImplementedError

    def metric_fns(self, rows: list[dict], features: list[dict], tokenizer) -> list:
        return []

    def majority_score(self, train_rows: list[dict], eval_rows: list[dict]) -> float | None:
        """The primary metric of always predicting the majority training class (None if
        the notion does not apply)."""
        return None

    has_scores = False  # predict(..., scores=True) gives class probabilities

    @torch.no_grad()
    def predict(self, model, tokenizer, rows: list[dict], *, batch_size: int = 16) -> list:
        raise NotImplementedError


def label_name(value) -> str:
    return value if isinstance(value, str) else str(value)


def distinct_labels(values, what: str) -> list:
    """The sorted distinct labels among ``values``, refusing a mix of forms: ``0`` and
    ``"0"`` would silently become two classes (JSON from one tool, CSV from another)."""
    distinct = set(values)
    names = sorted(str(v) for v in distinct if isinstance(v, str))
    others = sorted(repr(v) for v in distinct if not isinstance(v, str))
    if names and others:
        raise ValueError(f"{what} mix label forms: {', '.join(others[:5])} and {', '.join(map(repr, names[:5]))} "
                         "(numbers and strings); use one form")
    return sorted(distinct, key=lambda v: (isinstance(v, str), v))
