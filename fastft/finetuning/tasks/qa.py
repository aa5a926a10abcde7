"""Extractive question answering (SQuAD format): a start and an end position per answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.finetuning.metrics import qa_scores
from fastft.finetuning.tasks.base import Task, forward_names
from fastft.train.objectives import Objective, model_inputs

__all__ = ["QAMetrics", "QuestionAnsweringTask", "SpanObjective"]


class SpanObjective(Objective):
    """Extractive QA: mean of the start and end cross-entropies per feature (window)."""

    name = "span"

    def counts(self, batch):
        return {"span": int(batch["start_positions"].numel())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("start_positions", "end_positions")))
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return {"span": (start + end) / 2}, out


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
    higher_is_better = ("f1", "exact_match")

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
        names = forward_names(model)
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
