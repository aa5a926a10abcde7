"""Sequence classification (single texts or pairs, read from [CLS]) and regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.finetuning.metrics import ClassificationMetrics, RegressionMetrics
from fastft.finetuning.tasks.base import Task, distinct_labels, forward_names, label_name
from fastft.train.objectives import Objective, model_inputs

__all__ = ["ClassificationTask", "RegressionObjective", "RegressionTask", "SequenceClassificationObjective"]


class SequenceClassificationObjective(Objective):
    """Cross-entropy of the head's logits (B, C) from the [CLS] representation."""

    name = "cls"

    def counts(self, batch):
        return {"cls": int(batch["labels"].numel())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        return {"cls": F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")}, out


class RegressionObjective(Objective):
    """Squared error of the single output (B, 1) against float labels (B,)."""

    name = "mse"

    def counts(self, batch):
        return {"mse": int(batch["labels"].numel())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        prediction = out.logits.float().reshape(-1)  # (B,)
        return {"mse": ((prediction - batch["labels"].float()) ** 2).sum()}, out


class ClassificationTask(Task):
    """Single sentences (``text``) or pairs (``text`` + ``text_pair``) -> one class.

    Labels may be class names or ids; ``labels=[names]`` fixes the classes (else: the
    sorted distinct training labels). The head reads the [CLS] position (BERT's pooler)."""

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    required_columns = ("text", "label")
    primary_metric = "accuracy"
    higher_is_better = ("accuracy", "macro_f1")
    has_scores = True
    # Probabilities are softmax(logits / temperature): a bundle fitted with temperature scaling
    # (finetune(..., calibrate=True); fastft.audit.calibration) sets it, predict returns them calibrated.
    temperature = 1.0

    def option_names(self):
        return ("text_column", "pair_column", "label_column")

    @property
    def text_column(self):
        return self.options.get("text_column", "text")

    @property
    def pair_column(self):
        return self.options.get("pair_column", "text_pair")

    @property
    def label_column(self):
        return self.options.get("label_column", "label")

    def check_columns(self, rows, set_name):
        self.required_columns = (self.text_column, self.label_column)
        super().check_columns(rows, set_name)

    def fit_labels(self, train_rows):
        if self.labels is None:
            self.labels = distinct_labels((row[self.label_column] for row in train_rows), "the training rows")

    def label_id(self, value) -> int:
        """Class id of a label given as a name or an id."""
        if value in self.labels:
            return self.labels.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and not any(isinstance(l, int) for l in self.labels):
            if 0 <= value < len(self.labels):
                return value
        raise KeyError(value)

    def check_labels(self, rows, set_name):
        bad = []
        for i, row in enumerate(rows):
            try:
                self.label_id(row[self.label_column])
            except KeyError:
                bad.append((i, row[self.label_column]))
        if bad:
            shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:5])
            raise ValueError(
                f"data[{set_name!r}] has {len(bad)} label(s) outside the configured classes {self.labels} ({shown})"
            )

    def num_outputs(self) -> int:
        return len(self.labels)

    def check_model(self, model):
        names = forward_names(model)
        head = type(model).__name__
        if not head.endswith("ForSequenceClassification") or "labels" not in names:
            raise ValueError(
                f"task {self.name!r} needs a sequence-classification head (AutoModelForSequenceClassification); "
                f"got {head}"
            )
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != self.num_outputs():
            raise ValueError(
                f"task {self.name!r}: the model's head has {num_labels} output(s), the task needs {self.num_outputs()} "
                f"(labels {self.labels}); build it with num_labels={self.num_outputs()}"
            )

    def model_kwargs(self):
        names = [label_name(l) for l in self.labels]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    def _encode(self, rows, tokenizer):
        texts = [row[self.text_column] for row in rows]
        pairs = [row.get(self.pair_column) for row in rows]
        if any(p is not None for p in pairs):
            return tokenizer(texts, [p or "" for p in pairs], truncation=True, max_length=self.max_length)
        return tokenizer(texts, truncation=True, max_length=self.max_length)

    def _target(self, row):
        return self.label_id(row[self.label_column])

    def preprocess(self, rows, tokenizer, *, training):
        encoded = self._encode(rows, tokenizer)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        features = []
        for i, row in enumerate(rows):
            feature = {k: list(encoded[k][i]) for k in keys}
            if self.label_column in row and row[self.label_column] is not None:
                feature["labels"] = self._target(row)
            features.append(feature)
        return features

    def objective(self):
        return SequenceClassificationObjective()

    def metric_fns(self, rows, features, tokenizer):
        return [ClassificationMetrics([label_name(l) for l in self.labels])]

    def majority_score(self, train_rows, eval_rows):
        from fastft.finetuning.metrics import majority_baseline

        return majority_baseline([self._target(r) for r in train_rows], [self._target(r) for r in eval_rows])

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16, scores=False):
        """The predicted label per row; with ``scores``, ``{"label", "probabilities":
        {label: p}}`` per row instead."""
        return [self._decode(row, scores) for row in self.logits(model, tokenizer, rows, batch_size=batch_size)]

    @torch.no_grad()
    def logits(self, model, tokenizer, rows, *, batch_size=16) -> torch.Tensor:
        """The head's outputs for ``rows`` (labels, if any, are ignored): (len(rows), C) fp32."""
        device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        outputs = []
        for start in range(0, len(rows), batch_size):
            chunk = [{k: v for k, v in r.items() if k != self.label_column} for r in rows[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(self.preprocess(chunk, tokenizer, training=False)).items()}
            outputs.append(model(**model_inputs(model, batch)).logits.float().cpu())  # (B, C)
        return torch.cat(outputs)

    def _decode(self, logits, scores):
        probabilities = (logits / self.temperature).softmax(-1)
        label = self.labels[int(probabilities.argmax())]
        if not scores:
            return label
        return {"label": label, "probabilities": {label_name(l): float(p) for l, p in zip(self.labels, probabilities)}}


class RegressionTask(ClassificationTask):
    """One real-valued output per text (pair), trained with mean squared error."""

    name = "regression"
    primary_metric = "mse"
    higher_is_better = ("pearson",)
    has_scores = False

    def fit_labels(self, train_rows):
        self.labels = None

    def check_labels(self, rows, set_name):
        bad = [(i, row[self.label_column]) for i, row in enumerate(rows)
               if isinstance(row[self.label_column], bool) or not isinstance(row[self.label_column], (int, float))]
        if bad:
            raise ValueError(f"task 'regression': data[{set_name!r}] has non-numeric labels ({bad[:5]})")

    def num_outputs(self):
        return 1

    def model_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

    def _target(self, row):
        return float(row[self.label_column])

    def objective(self):
        return RegressionObjective()

    def metric_fns(self, rows, features, tokenizer):
        return [RegressionMetrics()]

    def majority_score(self, train_rows, eval_rows):
        return None

    def _decode(self, logits, scores):
        return float(logits.reshape(-1)[0])
