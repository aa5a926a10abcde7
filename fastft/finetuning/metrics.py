"""Task metrics for fine-tuning: accuracy, macro-F1, per-class report, extractive-QA exact
match / token F1 (the SQuAD v1.1 definitions), BLEU (sacrebleu) and perplexity.

Plain functions over Python lists, plus small accumulators with the interface the training
loop's ``evaluate(..., metric_fns=...)`` expects: ``update(batch, outputs)`` once per batch
and ``compute() -> dict`` at the end (which also resets them for the next evaluation).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Sequence

import torch

from fastft.data.collators import IGNORE_INDEX
from fastft.train.metrics import perplexity

__all__ = [
    "ClassificationMetrics",
    "RegressionMetrics",
    "TokenClassificationMetrics",
    "accuracy",
    "bleu",
    "classification_report",
    "exact_match",
    "macro_f1",
    "majority_baseline",
    "normalize_answer",
    "perplexity",
    "qa_scores",
    "token_f1",
]


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Share of positions where prediction == reference (nan for no examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def classification_report(
    predictions: Sequence[int], references: Sequence[int], labels: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support: ``{label name: {"precision", "recall",
    "f1", "support"}}``. Classes are ``range(len(labels))`` when ``labels`` is given, else
    every id seen in either list. A class never predicted has precision 0 (and F1 0)."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    classes = list(range(len(labels))) if labels is not None else sorted(set(predictions) | set(references))
    report = {}
    for c in classes:
        true_pos = sum(1 for p, r in zip(predictions, references) if p == c and r == c)
        predicted = sum(1 for p in predictions if p == c)
        support = sum(1 for r in references if r == c)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        name = str(labels[c]) if labels is not None else str(c)
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return report


def macro_f1(predictions: Sequence[int], references: Sequence[int], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in ``references``
    (a class absent from the references and never predicted would add a meaningless 0)."""
    report = classification_report(predictions, references, labels)
    present = set(references) | set(predictions)
    names = [str(labels[c]) if labels is not None else str(c) for c in sorted(present)]
    if not names:
        return float("nan")
    return sum(report[n]["f1"] for n in names) / len(names)


def majority_baseline(train_labels: Sequence[Any], references: Sequence[Any]) -> float:
    """Accuracy on ``references`` of always answering the most common training label."""
    if not train_labels or not references:
        return float("nan")
    majority = collections.Counter(train_labels).most_common(1)[0][0]
    return accuracy([majority] * len(references), references)


# ------------------------------------------------------------------------ extractive QA


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop punctuation and the articles a/an/the,
    collapse whitespace (Rajpurkar et al. 2016, the official evaluation script's rules)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalised prediction and any gold answer."""
    best = 0.0
    predicted_tokens = normalize_answer(prediction).split()
    for answer in answers:
        gold_tokens = normalize_answer(answer).split()
        if not predicted_tokens or not gold_tokens:
            best = max(best, float(predicted_tokens == gold_tokens))
            continue
        common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` averaged over examples, as fractions in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) differ in length")
    if not predictions:
        return {"exact_match": float("nan"), "f1": float("nan")}
    return {
        "exact_match": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(predictions),
        "f1": sum(token_f1(p, a) for p, a in zip(predictions, answers)) / len(predictions),
    }


# ------------------------------------------------------------------------ generation


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0..100) from sacrebleu (Post 2018), its default 13a tokenisation.

    ``references``: one string per hypothesis, or a list of alternatives per hypothesis.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses ({len(hypotheses)}) and references ({len(references)}) differ in length")
    if not hypotheses:
        return float("nan")
    alternatives = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max(len(a) for a in alternatives)
    # sacrebleu wants reference *streams*: stream j holds every hypothesis' j-th reference.
    streams = [[a[j] if j < len(a) else a[0] for a in alternatives] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


# ------------------------------------------------------------------------ accumulators


class ClassificationMetrics:
    """Accuracy, macro-F1 and the per-class report from ``outputs.logits`` (B, C) and
    ``batch["labels"]`` (B,)."""

    def __init__(self, labels: Sequence[str] | None = None):
        self.labels = list(labels) if labels is not None else None
        self.predictions: list[int] = []
        self.references: list[int] = []

    def update(self, batch, outputs) -> None:
        self.predictions += outputs.logits.argmax(-1).tolist()
        self.references += batch["labels"].tolist()

    def compute(self) -> dict[str, Any]:
        result = {
            "accuracy": accuracy(self.predictions, self.references),
            "macro_f1": macro_f1(self.predictions, self.references, self.labels),
            "per_class": classification_report(self.predictions, self.references, self.labels),
        }
        self.predictions, self.references = [], []
        return result


class TokenClassificationMetrics:
    """Accuracy and macro-F1 over supervised tokens (first sub-words; labels != -100),
    from ``outputs.logits`` (B, T, C) and ``batch["labels"]`` (B, T)."""

    def __init__(self, labels: Sequence[str] | None = None):
        self.labels = list(labels) if labels is not None else None
        self.predictions: list[int] = []
        self.references: list[int] = []

    def update(self, batch, outputs) -> None:
        labels = batch["labels"]  # (B, T)
        keep = labels != IGNORE_INDEX
        self.predictions += outputs.logits.argmax(-1)[keep].tolist()
        self.references += labels[keep].tolist()

    def compute(self) -> dict[str, Any]:
        result = {
            "accuracy": accuracy(self.predictions, self.references),
            "macro_f1": macro_f1(self.predictions, self.references, self.labels),
            "per_class": classification_report(self.predictions, self.references, self.labels),
        }
        self.predictions, self.references = [], []
        return result


class RegressionMetrics:
    """Mean squared error and Pearson correlation of ``outputs.logits[:, 0]`` vs labels."""

    def __init__(self):
        self.predictions: list[float] = []
        self.references: list[float] = []

    def update(self, batch, outputs) -> None:
        self.predictions += outputs.logits.float().reshape(-1).tolist()
        self.references += batch["labels"].float().reshape(-1).tolist()

    def compute(self) -> dict[str, float]:
        p = torch.tensor(self.predictions, dtype=torch.float64)
        r = torch.tensor(self.references, dtype=torch.float64)
        self.predictions, self.references = [], []
        if p.numel() == 0:
            return {"mse": float("nan"), "pearson": float("nan")}
        mse = float(((p - r) ** 2).mean())
        pearson = float(torch.corrcoef(torch.stack([p, r]))[0, 1]) if p.numel() > 1 else float("nan")
        return {"mse": mse, "pearson": pearson}
