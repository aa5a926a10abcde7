"""Fine-tuning tasks, one file each; ``get_task("classification", labels=[...])`` builds one.

    task           file               columns                                   model head
    -------------  -----------------  ----------------------------------------  ------------------------------
    classification classification.py  text [, text_pair], label                  *ForSequenceClassification
    regression     classification.py  text [, text_pair], label (float)          *ForSequenceClassification, 1
    token          token.py           tokens (list of words), tags (list)        *ForTokenClassification
    qa             qa.py              question, context, answers                 *ForQuestionAnswering
    sft            sft.py             prompt, response                           *ForCausalLM / *LMHeadModel
    reward         reward.py          prompt, chosen, rejected [, margin]        *ForSequenceClassification, 1

A new task subclasses ``Task`` (``base.py``) in a file of its own and registers in ``TASKS``.
"""

from __future__ import annotations

from typing import Mapping

from fastft.finetuning.tasks.base import Task
from fastft.finetuning.tasks.classification import ClassificationTask, RegressionTask
from fastft.finetuning.tasks.qa import QuestionAnsweringTask
from fastft.finetuning.tasks.reward import RewardTask
from fastft.finetuning.tasks.sft import SFTTask
from fastft.finetuning.tasks.token import TokenClassificationTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "QuestionAnsweringTask",
    "RegressionTask",
    "RewardTask",
    "SFTTask",
    "Task",
    "TokenClassificationTask",
    "get_task",
]

TASKS = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "token": TokenClassificationTask,
    "qa": QuestionAnsweringTask,
    "sft": SFTTask,
    "reward": RewardTask,
}
TASK_ALIASES = {
    "sequence-classification": "classification",
    "seq-cls": "classification",
    "token-classification": "token",
    "tagging": "token",
    "question-answering": "qa",
    "instruction": "sft",
    "reward-model": "reward",
}


def get_task(task, current: Task | None = None, **options) -> Task:
    """A ``Task`` from a name (see ``TASKS``; aliases such as ``"token-classification"``),
    a mapping ``{"name": ..., **options}`` (a config file's form; without ``name``: the
    options update ``current``), or a ``Task`` (returned as is).

    Raises:
        ValueError: unknown name, listing the valid ones.
        TypeError: an option the task does not take.
    """
    if isinstance(task, Task):
        return task
    if isinstance(task, Mapping):
        options = {**dict(task), **options}
        task = options.pop("name", None)
        if task is None:
            if current is None:
                raise ValueError(f"task {options}: which one? add name: one of {sorted(TASKS)}")
            spec = current.spec()
            task, options = spec.pop("name"), {**spec, **options}
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)} (or {sorted(TASK_ALIASES)}), got {task!r}")
    return TASKS[name](**options)
