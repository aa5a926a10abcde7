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
``fastft.train.objectives``) and reports ``metric_fns`` during evaluation. ``validate``
checks data and model *before* any training starts, with a message naming what is wrong.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fastft.train.objectives import IGNORE_INDEX, Objective, model_inputs
from fastft.train.task_metrics import (
    ClassificationMetrics,
    RegressionMetrics,
    TokenClassificationMetrics,
    bleu,
    qa_scores,
)

__all__ = [
    "TASKS",
    "ClassificationTask",
    "PadCollator",
    "QuestionAnsweringTask",
    "RegressionTask",
    "SFTTask",
    "Task",
    "TokenClassificationTask",
    "get_task",
    "rows_of",
]


def rows_of(data) -> list[dict]:
    """A list of dicts from a list of dicts or a ``datasets.Dataset``."""
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return list(data)
    if hasattr(data, "to_list"):
        return data.to_list()
    raise TypeError(f"data must be a list of dicts or a datasets.Dataset, got {type(data).__name__}")


def _forward_names(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class PadCollator:
    """Right-pads the sequence fields of features to the batch's longest one.

    ``input_ids`` with the tokenizer's pad id, ``attention_mask`` / ``token_type_ids`` with
    0, sequence ``labels`` with -100 (ignored by the loss); scalar fields (class labels,
    start/end positions, feature_index) become 1-D tensors. Float labels stay float
    (regression)."""

    SEQUENCE_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features: an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in features[0]:
            if key == "offset_mapping":
                continue
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self.pad_id if key == "input_ids" else self.SEQUENCE_PAD.get(key, 0)
                out = torch.full((len(values), length), pad, dtype=torch.long)  # (B, T)
                for i, row in enumerate(values):
                    out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
                batch[key] = out
            else:
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)  # (B,)
        return batch


# ------------------------------------------------------------------------ objectives


class SequenceClassificationObjective(Objective):
    """Cross-entropy of the head's logits (B, C) from the [CLS] representation."""

    name = "cls"

    def counts(self, batch):
        return {"cls": int(batch["labels"].numel())}

    def loss(self, model, batch):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        return {"cls": F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")}, out


class RegressionObjective(Objective):
    """Squared error of the single output (B, 1) against float labels (B,)."""

    name = "mse"

    def counts(self, batch):
        return {"mse": int(batch["labels"].numel())}

    def loss(self, model, batch):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        prediction = out.logits.float().reshape(-1)  # (B,)
        return {"mse": ((prediction - batch["labels"].float()) ** 2).sum()}, out


class TokenClassificationObjective(Objective):
    """Cross-entropy per supervised token (first sub-word of each word; others are -100)."""

    name = "tags"

    def counts(self, batch):
        return {"tags": int((batch["labels"] != IGNORE_INDEX).sum())}

    def loss(self, model, batch):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        logits = out.logits.float()  # (B, T, C)
        summed = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return {"tags": summed}, out


class SpanObjective(Objective):
    """Extractive QA: mean of the start and end cross-entropies per feature (window)."""

    name = "span"

    def counts(self, batch):
        return {"span": int(batch["start_positions"].numel())}

    def loss(self, model, batch):
        out = model(**model_inputs(model, batch, exclude=("start_positions", "end_positions")))
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return {"span": (start + end) / 2}, out


class ResponseLMObjective(Objective):
    """Instruction SFT: causal-LM loss on response tokens only (prompt labels are -100).

    The model shifts (logits at t score labels[t + 1]), so the counted tokens are
    ``labels[:, 1:] != -100``; the loss goes through the model's own ``labels=`` path
    (fastft.patch's fused loss when patched) and its mean is turned back into a sum."""

    name = "sft"
    perplexity_term = "sft"

    def counts(self, batch):
        return {"sft": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch):
        count = self.counts(batch)["sft"]
        out = model(**model_inputs(model, batch))
        mean = out.loss.to(torch.promote_types(out.loss.dtype, torch.float32))
        return {"sft": mean * count if count else mean.new_zeros(())}, out


# ------------------------------------------------------------------------ tasks


class Task:
    """Base class. Subclasses set the class attributes and implement the hooks."""

    name = "task"
    auto_class = "AutoModel"  # the transformers Auto* class that builds the right head
    required_columns: tuple[str, ...] = ()
    primary_metric = "loss"
    greater_is_better = False
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
        from fastft.data.collators import pad_id_of

        return PadCollator(pad_id_of(tokenizer))

    def objective(self) -> Objective:
        raise NotImplementedError

    def metric_fns(self, rows: list[dict], features: list[dict], tokenizer) -> list:
        return []

    def majority_score(self, train_rows: list[dict], eval_rows: list[dict]) -> float | None:
        """The primary metric of always predicting the majority training class (None if
        the notion does not apply)."""
        return None

    @torch.no_grad()
    def predict(self, model, tokenizer, rows: list[dict], *, batch_size: int = 16) -> list:
        raise NotImplementedError


def _label_name(value) -> str:
    return value if isinstance(value, str) else str(value)


class ClassificationTask(Task):
    """Single sentences (``text``) or pairs (``text`` + ``text_pair``) -> one class.

    Labels may be class names or ids; ``labels=[names]`` fixes the classes (else: the
    sorted distinct training labels). The head reads the [CLS] position (BERT's pooler)."""

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    required_columns = ("text", "label")
    primary_metric = "accuracy"
    greater_is_better = True

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
            values = {row[self.label_column] for row in train_rows}
            self.labels = sorted(values, key=lambda v: (isinstance(v, str), v))

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
        names = _forward_names(model)
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
        names = [_label_name(l) for l in self.labels]
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
        return [ClassificationMetrics([_label_name(l) for l in self.labels])]

    def majority_score(self, train_rows, eval_rows):
        from fastft.train.task_metrics import majority_baseline

        return majority_baseline([self._target(r) for r in train_rows], [self._target(r) for r in eval_rows])

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16):
        device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        results = []
        for start in range(0, len(rows), batch_size):
            chunk = [{k: v for k, v in r.items() if k != self.label_column} for r in rows[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(self.preprocess(chunk, tokenizer, training=False)).items()}
            logits = model(**model_inputs(model, batch)).logits.float()  # (B, C)
            results += self._decode(logits)
        return results

    def _decode(self, logits):
        probabilities = logits.softmax(-1)
        return [self.labels[i] for i in probabilities.argmax(-1).tolist()]


class RegressionTask(ClassificationTask):
    """One real-valued output per text (pair), trained with mean squared error."""

    name = "regression"
    primary_metric = "mse"
    greater_is_better = False

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

    def _decode(self, logits):
        return logits.reshape(-1).tolist()


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
    greater_is_better = True

    def fit_labels(self, train_rows):
        if self.labels is None:
            self.labels = sorted({t for row in train_rows for t in row["tags"]}, key=lambda v: (isinstance(v, str), v))

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
        names = [_label_name(l) for l in self.labels]
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
        return [TokenClassificationMetrics([_label_name(l) for l in self.labels])]

    def majority_score(self, train_rows, eval_rows):
        from fastft.train.task_metrics import majority_baseline

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


class QAMetrics:
    """Exact match / token F1 of extractive QA: collects start/end logits per feature
    (window) during evaluation, then maps the best span of each *example* back to text."""

    def __init__(self, task: "QuestionAnsweringTask", rows: list[dict], features: list[dict]):
        self.task, self.rows, self.features = task, rows, features
        self.logits: dict[int, tuple[list[float], list[float]]] = {}

    def update(self, batch, outputs):
        for index, start, end in zip(batch["feature_index"].tolist(), outputs.start_logits.float().tolist(),
                                     outputs.end_logits.float().tolist()):
            self.logits[index] = (start, end)

    def compute(self):
        predictions = self.task.spans_to_answers(self.rows, self.features, self.logits)
        self.logits = {}
        scored = [(p, r["answers"]["text"]) for p, r in zip(predictions, self.rows) if p is not None]
        return qa_scores([p for p, _ in scored], [a for _, a in scored])


class QuestionAnsweringTask(Task):
    """Extractive QA (SQuAD format): predict the start and end token of the answer span.

    Long contexts are cut into windows of ``max_length`` tokens overlapping by ``stride``
    tokens (the question repeated in each). A window that does not contain the whole
    answer is trained to point at [CLS] (position 0), as in BERT's SQuAD set-up. Token
    ``offset_mapping`` (character spans in the context) maps predicted spans back to the
    original text, so answers come back exactly as written in the context."""

    name = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    required_columns = ("question", "context", "answers")
    primary_metric = "f1"
    greater_is_better = True

    def option_names(self):
        return ("stride", "max_answer_length", "n_best")

    @property
    def stride(self):
        return self.options.get("stride", min(64, self.max_length // 4))

    def check_labels(self, rows, set_name):
        for i, row in enumerate(rows):
            answers = row["answers"]
            if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
                raise ValueError(f"data[{set_name!r}] row {i}: answers must be {{'text': [...], 'answer_start': [...]}}")
            for text, start in zip(answers["text"], answers["answer_start"]):
                if row["context"][start : start + len(text)] != text:
                    raise ValueError(
                        f"data[{set_name!r}] row {i}: answer {text!r} is not at character {start} of the context"
                    )

    def check_model(self, model):
        names = _forward_names(model)
        if "start_positions" not in names or not hasattr(model, "qa_outputs"):
            raise ValueError(
                f"task 'qa' needs a model with a span head (start/end logits, AutoModelForQuestionAnswering); "
                f"{type(model).__name__} has none"
            )

    def preprocess(self, rows, tokenizer, *, training):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("task 'qa' needs a fast tokenizer (offset mappings)")
        if self.stride >= self.max_length // 2:
            raise ValueError(f"qa: stride ({self.stride}) must be below half of max_length ({self.max_length})")
        encoded = tokenizer(
            [row["question"] for row in rows],
            [row["context"] for row in rows],
            truncation="only_second",
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        features = []
        for f, example in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence_ids = encoded.sequence_ids(f)
            # Keep character offsets only for context tokens: those are the candidate spans.
            offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][f], sequence_ids)]
            feature = {k: list(encoded[k][f]) for k in keys}
            feature["feature_index"] = len(features)
            feature["example_index"] = example
            feature["offset_mapping"] = offsets
            answers = rows[example].get("answers")
            if answers and answers.get("text"):
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
                context_tokens = [t for t, o in enumerate(offsets) if o is not None]
                first, last = context_tokens[0], context_tokens[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start_token = next(t for t in context_tokens if offsets[t][1] > start_char)
                    end_token = next(t for t in reversed(context_tokens) if offsets[t][0] < end_char)
                else:  # the answer is not (wholly) in this window: point at [CLS]
                    start_token = end_token = 0
                feature["start_positions"], feature["end_positions"] = start_token, end_token
            features.append(feature)
        return features

    def collator(self, tokenizer):
        base = super().collator(tokenizer)

        def collate(features):
            return base([{k: v for k, v in f.items() if k not in ("example_index", "offset_mapping")} for f in features])

        return collate

    def spans_to_answers(self, rows, features, logits_by_feature) -> list[str | None]:
        """The best-scoring valid span (start <= end, length <= ``max_answer_length``, both
        in the context) of each example over all its windows, as context text. Examples
        with no evaluated window give None."""
        n_best = self.options.get("n_best", 20)
        max_answer_length = self.options.get("max_answer_length", 30)
        best: dict[int, tuple[float, str]] = {}
        for feature in features:
            if feature["feature_index"] not in logits_by_feature:
                continue
            start_logits, end_logits = logits_by_feature[feature["feature_index"]]
            offsets = feature["offset_mapping"]
            length = len(offsets)
            starts = sorted(range(length), key=lambda t: -start_logits[t])[:n_best]
            ends = sorted(range(length), key=lambda t: -end_logits[t])[:n_best]
            context = rows[feature["example_index"]]["context"]
            for s in starts:
                for e in ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[s] + end_logits[e]
                    example = feature["example_index"]
                    if example not in best or score > best[example][0]:
                        best[example] = (score, context[offsets[s][0] : offsets[e][1]])
        return [best[i][1] if i in best else ("" if any(f["example_index"] == i and f["feature_index"] in logits_by_feature for f in features) else None)
                for i in range(len(rows))]

    def objective(self):
        return SpanObjective()

    def metric_fns(self, rows, features, tokenizer):
        return [QAMetrics(self, rows, features)]

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16):
        device = next(model.parameters()).device
        rows = [{"question": r["question"], "context": r["context"]} for r in rows]
        features = self.preprocess(rows, tokenizer, training=False)
        collate = self.collator(tokenizer)
        logits = {}
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            out = model(**model_inputs(model, batch))
            for f, s, e in zip(chunk, out.start_logits.float().tolist(), out.end_logits.float().tolist()):
                logits[f["feature_index"]] = (s, e)
        return self.spans_to_answers(rows, features, logits)


class SFTTask(Task):
    """Instruction supervised fine-tuning of a causal LM on ``prompt`` / ``response`` pairs.

    A feature is ``[bos] prompt response [eos]`` with labels -100 on ``[bos] prompt``: the
    loss (and the reported perplexity) covers response tokens only, so the model learns to
    answer rather than to reproduce prompts. BLEU of greedy generations against the
    reference responses comes from ``evaluate_sets(..., generate=True)``."""

    name = "sft"
    auto_class = "AutoModelForCausalLM"
    required_columns = ("prompt", "response")
    primary_metric = "loss"
    greater_is_better = False
    head_modules = ()
    pretraining_objective = "clm"

    def option_names(self):
        return ("max_new_tokens",)

    def check_model(self, model):
        head = type(model).__name__
        if not head.endswith(("ForCausalLM", "LMHeadModel")):
            raise ValueError(f"task 'sft' needs a causal language model (AutoModelForCausalLM); got {head}")

    def _prompt_ids(self, tokenizer, prompt):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def preprocess(self, rows, tokenizer, *, training):
        eos = tokenizer.eos_token_id
        features = []
        for i, row in enumerate(rows):
            prompt = self._prompt_ids(tokenizer, row["prompt"])
            if len(prompt) >= self.max_length:
                raise ValueError(f"sft: row {i}'s prompt has {len(prompt)} tokens, max_length is {self.max_length}")
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] if row.get("response") is not None else []
            response = (response + ([eos] if eos is not None else []))[: self.max_length - len(prompt)]
            ids = prompt + response
            features.append({
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt) + response,
            })
        return features

    def objective(self):
        return ResponseLMObjective()

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16, max_new_tokens=None):
        """Greedy continuations of each ``prompt`` (one at a time: no padding subtleties)."""
        max_new_tokens = max_new_tokens or self.options.get("max_new_tokens", 32)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        outputs = []
        try:
            for row in rows:
                prompt = torch.tensor([self._prompt_ids(tokenizer, row["prompt"])], device=device)  # (1, P)
                generated = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[0, prompt.shape[1]:].tolist()
                outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        finally:
            model.train(was_training)
        return outputs

    def generation_metrics(self, model, tokenizer, rows) -> dict[str, float]:
        hypotheses = self.predict(model, tokenizer, rows)
        references = [tokenizer.decode(tokenizer(r["response"], add_special_tokens=False)["input_ids"],
                                       skip_special_tokens=True).strip() for r in rows]
        return {"bleu": bleu(hypotheses, references)}


TASKS = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "token": TokenClassificationTask,
    "qa": QuestionAnsweringTask,
    "sft": SFTTask,
}
TASK_ALIASES = {
    "sequence-classification": "classification",
    "seq-cls": "classification",
    "token-classification": "token",
    "tagging": "token",
    "question-answering": "qa",
    "instruction": "sft",
}


def get_task(task: str | Task, **options) -> Task:
    """A ``Task`` from a name (see ``TASKS``; aliases such as ``"token-classification"``) or itself.

    Raises:
        ValueError: unknown name, listing the valid ones.
        TypeError: an option the task does not take.
    """
    if isinstance(task, Task):
        return task
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)} (or {sorted(TASK_ALIASES)}), got {task!r}")
    return TASKS[name](**options)
