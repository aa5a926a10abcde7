"""What selection and the audit read from a fine-tuned model, in one pass over the rows:

    logits       (N, U, C) fp32   U = 1 for a sequence classifier; for a token tagger U
                                  is the longest row's word count (first sub-words)
    unit_mask    (N, U) bool      which of the U slots are real words (all True for U = 1)
    embeddings   (N, H)           the last hidden layer at position 0 ([CLS]; a causal
                                  classifier: its last real token)       (``embeddings=True``)
    head_inputs  (N, U, H')       what the task head's last linear layer reads (BERT: the
                                  pooled [CLS]; RoBERTa: the head's dense output) (``head_inputs=True``)

``mc_dropout`` runs the same pass with the model's dropout layers in training mode (every
other module in eval mode), ``passes`` times, for Monte-Carlo dropout (BALD).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from fastft.train.objectives import model_inputs

__all__ = ["ModelOutputs", "mc_dropout", "model_outputs", "resolve_model"]

SUPPORTED_TASKS = ("classification", "token")


def resolve_model(model_or_bundle, tokenizer=None, task=None, device=None):
    """``(model, tokenizer, task)`` from a bundle directory (``fastft finetune``'s
    ``…/finetuned``), a ``FinetuneResult`` (anything with ``model`` / ``tokenizer`` /
    ``task``), or a model with ``tokenizer=`` and ``task=``.

    Raises:
        FileNotFoundError: a path that holds no bundle.
        ValueError: a model without a tokenizer or task; a task with no class scores.
    """
    if isinstance(model_or_bundle, str):
        from fastft.finetuning.bundle import load_finetuned

        model, loaded_tokenizer, loaded_task = load_finetuned(model_or_bundle, device=device or "cpu")
        tokenizer, task = tokenizer or loaded_tokenizer, task or loaded_task
    elif isinstance(model_or_bundle, nn.Module):
        model = model_or_bundle
    elif all(hasattr(model_or_bundle, a) for a in ("model", "tokenizer", "task")):
        model = model_or_bundle.model
        tokenizer, task = tokenizer or model_or_bundle.tokenizer, task or model_or_bundle.task
    else:
        raise TypeError(f"give a bundle directory, a FinetuneResult or a model, got {type(model_or_bundle).__name__}")
    if tokenizer is None or task is None:
        raise ValueError("with a model object, pass tokenizer= and task= (e.g. result.task)")
    if isinstance(task, str):
        from fastft.finetuning.tasks import get_task

        task = get_task(task)
    if task.name not in SUPPORTED_TASKS:
        raise ValueError(f"task {task.name!r} gives no class probabilities; this works on {list(SUPPORTED_TASKS)}")
    if task.labels is None:
        raise ValueError(f"task {task.name!r} has no label map: give the task its labels (e.g. result.task)")
    if device is not None:
        model.to(device)
    return model, tokenizer, task


@dataclass
class ModelOutputs:
    logits: torch.Tensor  # (N, U, C) fp32; padded units hold 0
    unit_mask: torch.Tensor  # (N, U) bool
    embeddings: torch.Tensor | None = None  # (N, H)
    head_inputs: torch.Tensor | None = None  # (N, U, H')

    def probabilities(self, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / temperature) over the classes: (N, U, C)."""
        return (self.logits / temperature).softmax(-1)


def _head_linear(model: nn.Module, num_labels: int) -> nn.Module:
    """The last module (in registration order) with ``out_features == num_labels``: the
    task head's output layer (``classifier``, ``out_proj``, ``score`` ...)."""
    found = [m for m in model.modules() if getattr(m, "out_features", None) == num_labels]
    if not found:
        raise ValueError(f"{type(model).__name__}: no output layer with {num_labels} outputs found")
    return found[-1]


def _first_pieces(word_ids: list[list[int]], length: int) -> torch.Tensor:
    """(B, length) bool: True at each word's first sub-word (word ids: -1 for specials)."""
    mask = torch.zeros(len(word_ids), length, dtype=torch.bool)
    for i, ids in enumerate(word_ids):
        previous = None
        for j, word in enumerate(ids):
            mask[i, j] = word >= 0 and word != previous
            previous = word
    return mask


def _row_positions(batch: dict) -> torch.Tensor:
    """(B,) the last non-padding position of each row (right padding)."""
    return batch["attention_mask"].sum(-1).clamp(min=1) - 1


@torch.no_grad()
def model_outputs(model: nn.Module, tokenizer, task, rows: list[dict], *, batch_size: int = 32,
                  embeddings: bool = False, head_inputs: bool = False) -> ModelOutputs:
    """One forward pass over ``rows`` (their labels, if any, are ignored); see the module
    docstring for what comes back. The model's train/eval mode is left as it was found
    (call inside ``mc_dropout`` for dropout samples; otherwise the pass is in eval mode)."""
    device = next(model.parameters()).device
    collate = task.collator(tokenizer)
    token_task = task.name == "token"
    label_columns = {"tags"} if token_task else {getattr(task, "label_column", "label")}
    captured: list[torch.Tensor] = []
    hook = None
    if head_inputs:
        hook = _head_linear(model, len(task.labels)).register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    logits, cls, heads = [], [], []
    causal = not getattr(model.config, "is_encoder_decoder", False) and getattr(model.config, "is_decoder", False)
    causal = causal or type(model).__name__.startswith(("GPT", "Llama", "Mistral", "Qwen", "Gemma", "Phi"))
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [{k: v for k, v in r.items() if k not in label_columns} for r in rows[start:start + batch_size]]
            features = task.preprocess(chunk, tokenizer, training=False)
            word_ids = [f.pop("word_ids") for f in features] if token_task else None
            batch = {k: v.to(device) for k, v in collate(features).items()}
            captured.clear()
            out = model(**model_inputs(model, batch), **({"output_hidden_states": True} if embeddings else {}))
            batch_logits = out.logits.float().cpu()  # (B, C) or (B, T, C)
            positions = _row_positions(batch).cpu()
            if token_task:
                mask = _first_pieces(word_ids, batch_logits.shape[1])  # (B, T)
                logits.append([batch_logits[i][mask[i]] for i in range(len(chunk))])  # per row (W_i, C)
            else:
                logits.append([row[None] for row in batch_logits])  # per row (1, C)
            if embeddings:
                last = out.hidden_states[-1].float().cpu()  # (B, T, H)
                where = positions if causal else torch.zeros_like(positions)
                cls.append(last[torch.arange(len(chunk)), where])  # (B, H)
            if head_inputs:
                h = captured[-1].cpu()  # (B, H') or (B, T, H')
                if token_task:
                    heads.append([h[i][mask[i]] for i in range(len(chunk))])
                elif h.dim() == 3:  # a causal classifier scores every position and keeps the last real one
                    heads.append([h[i, positions[i]][None] for i in range(len(chunk))])
                else:
                    heads.append([row[None] for row in h])
    finally:
        if hook is not None:
            hook.remove()
    per_row = [x for chunk in logits for x in chunk]
    width = max((x.shape[0] for x in per_row), default=1) or 1
    num_classes = len(task.labels)
    stacked = torch.zeros(len(per_row), width, num_classes)
    unit_mask = torch.zeros(len(per_row), width, dtype=torch.bool)
    for i, x in enumerate(per_row):
        stacked[i, : x.shape[0]] = x
        unit_mask[i, : x.shape[0]] = True
    result = ModelOutputs(stacked, unit_mask)
    if embeddings:
        result.embeddings = torch.cat(cls) if cls else torch.zeros(0, 0)
    if head_inputs:
        per_row_h = [x for chunk in heads for x in chunk]
        dim = per_row_h[0].shape[-1] if per_row_h else 0
        padded = torch.zeros(len(per_row_h), width, dim)
        for i, x in enumerate(per_row_h):
            padded[i, : x.shape[0]] = x
        result.head_inputs = padded
    return result


def dropout_modules(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


@contextlib.contextmanager
def mc_dropout(model: nn.Module, rate: float | None = None):
    """The model in eval mode except its ``nn.Dropout`` layers (training mode: they drop).
    ``rate`` sets every dropout layer's probability for the block (a model fine-tuned with
    dropout 0 has nothing to sample otherwise). Modes and rates are restored afterwards.

    Raises:
        ValueError: no dropout layer would drop anything (none, or all at p = 0, and no ``rate``).
    """
    layers = dropout_modules(model)
    if rate is not None and not 0.0 < rate < 1.0:
        raise ValueError(f"mc_dropout rate must be in (0, 1), got {rate}")
    if not layers or (rate is None and all(m.p == 0 for m in layers)):
        raise ValueError(f"{type(model).__name__} has no dropout to sample (no nn.Dropout with p > 0): pass a rate, "
                         "e.g. mc_dropout=0.1")
    was_training = model.training
    rates = [m.p for m in layers]
    model.eval()
    try:
        for m in layers:
            m.train()
            if rate is not None:
                m.p = rate
        yield model
    finally:
        for m, p in zip(layers, rates):
            m.p = p
        model.train(was_training)
