"""Token classification (tagging): one label per word, on its first sub-word."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.data.collators import IGNORE_INDEX
from fastft.finetuning.metrics import TokenClassificationMetrics
from fastft.finetuning.tasks.base import Task, distinct_labels, label_name
from fastft.train.objectives import Objective, model_inputs

__all__ = ["TokenClassificationObjective", "TokenClassificationTask"]


class TokenClassificationObjective(Objective):
    """Cross-entropy per supervised token (first sub-word of each word; others are -100)."""

    name = "tags"

    def counts(self, batch):
        return {"tags": int((batch["labels"] != IGNORE_INDEX).sum())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        logits = out.logits.float()  # (B, T, C)
        summed = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return {"tags": summed}, out


class TokenClassificationTask(Task):
    """Tagging (NER, POS): ``tokens`` (words) and ``tags`` (one label per word).

    Words are split into sub-words by a fast tokenizer (``is_split_into_words``); the label
    goes on each word's *first* sub-word and every other sub-word, special token and
    padding gets -100 (ignored), as in BERT's CoNLL-2003 set-up (Devlin et al. 2019, §5.3).
    """

    name = "token"
    auto_class = "AutoModelForTokenClassification"
    required_columns = ("tokens", "tags")
    primary_metric = "accuracy"
    higher_is_better = ("accuracy", "macro_f1")

    def fit_labels(self, train_rows):
        if self.labels is None:
            self.labels = distinct_labels((t for row in train_rows for t in row["tags"]), "the training rows' tags")

    def label_id(self, value):
        if value in self.labels:
            return self.labels.index(value)
        raise KeyError(value)

    def check_labels(self, rows, set_name):
        for i, row in enumerate(rows):
            if len(row["tokens"]) != len(row["tags"]):
                raise ValueError(f"data[{set_name!r}] row {i}: {len(row['tokens'])} tokens but {len(row['tags'])} tags")
            outside = [t for t in row["tags"] if t not in self.labels]
            if outside:
                raise ValueError(
                    f"data[{set_name!r}] row {i} has tag(s) {outside[:5]} outside the configured classes {self.labels}"
                )

    def check_model(self, model):
        head = type(model).__name__
        if not head.endswith("ForTokenClassification"):
            raise ValueError(f"task 'token' needs a token-classification head (AutoModelForTokenClassification); got {head}")
        if model.config.num_labels != len(self.labels):
            raise ValueError(
                f"task 'token': the model's head has {model.config.num_labels} outputs, the task needs {len(self.labels)} "
                f"(tags {self.labels})"
            )

    def model_kwargs(self):
        names = [label_name(l) for l in self.labels]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    def preprocess(self, rows, tokenizer, *, training):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("task 'token' needs a fast tokenizer (word_ids() maps sub-words to words)")
        encoded = tokenizer([row["tokens"] for row in rows], is_split_into_words=True, truncation=True,
                            max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        features = []
        for i, row in enumerate(rows):
            feature = {k: list(encoded[k][i]) for k in keys}
            word_ids = encoded.word_ids(i)
            feature["word_ids"] = [-1 if w is None else w for w in word_ids]
            if "tags" in row and row["tags"] is not None:
                labels, previous = [], None
                for word in word_ids:
                    first_piece = word is not None and word != previous
                    labels.append(self.label_id(row["tags"][word]) if first_piece else IGNORE_INDEX)
                    previous = word
                feature["labels"] = labels
            features.append(feature)
        return features

    def objective(self):
        return TokenClassificationObjective()

    def metric_fns(self, rows, features, tokenizer):
        return [TokenClassificationMetrics([label_name(l) for l in self.labels])]

    def majority_score(self, train_rows, eval_rows):
        from fastft.finetuning.metrics import majority_baseline

        return majority_baseline([t for r in train_rows for t in r["tags"]], [t for r in eval_rows for t in r["tags"]])

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16):
        """One tag per input word (words cut off by ``max_length`` get None)."""
        device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        results = []
        for start in range(0, len(rows), batch_size):
            chunk = [{"tokens": r["tokens"]} for r in rows[start : start + batch_size]]
            features = self.preprocess(chunk, tokenizer, training=False)
            batch = collate([{k: v for k, v in f.items() if k != "word_ids"} for f in features])
            batch = {k: v.to(device) for k, v in batch.items()}
            predicted = model(**model_inputs(model, batch)).logits.argmax(-1).tolist()  # (B, T)
            for row, feature, ids in zip(chunk, features, predicted):
                tags = [None] * len(row["tokens"])
                previous = None
                for position, word in enumerate(feature["word_ids"]):
                    if word >= 0 and word != previous:
                        tags[word] = self.labels[ids[position]]
                    previous = word
                results.append(tags)
        return results
