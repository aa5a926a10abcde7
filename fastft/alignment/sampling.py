"""Sampling completions from the policy through the model's ``generate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastft.alignment.data import PromptCollator, response_batch
from fastft.alignment.logprobs import evaluation_mode
from fastft.data.batching import to_device
from fastft.data.collators import pad_id_of

__all__ = ["Samples", "sample_completions"]


@dataclass
class Samples:
    """``k`` completions of each prompt, grouped: completion ``i * k + j`` is the j-th of
    prompt i. ``completion_ids`` run up to and including the first eos (or
    ``max_new_tokens`` tokens); ``texts`` are their decodings without special tokens."""

    prompt_ids: list[list[int]]  # one per completion (repeated k times)
    completion_ids: list[list[int]]
    texts: list[str]
    k: int

    def batch(self, tokenizer, device) -> dict[str, torch.Tensor]:
        """``response_batch`` of prompt + completion (labels on the completion), on ``device``."""
        return to_device(response_batch(self.prompt_ids, self.completion_ids, pad_id_of(tokenizer)), device)


def sample_completions(model, tokenizer, prompts: Sequence[Sequence[int]], *, k: int = 1, temperature: float = 1.0,
                       top_p: float = 1.0, max_new_tokens: int = 32, greedy: bool = False) -> Samples:
    """``k`` completions per prompt (token ids), sampled with ``temperature`` / ``top_p``
    (no top-k cut), or greedily; in eval mode, without autograd."""
    device = next(model.parameters()).device
    batch = to_device(PromptCollator(tokenizer)(prompts), device)  # left-padded (B, P)
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with evaluation_mode(model):
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=1 if greedy else k,
                                   pad_token_id=pad, eos_token_id=eos, **options)  # (B*k, P + new)
    new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
    repeats = 1 if greedy else k
    completions = []
    for tokens in new_tokens:
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        completions.append(tokens or [pad])
    prompt_ids = [list(p) for p in prompts for _ in range(repeats)]
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    return Samples(prompt_ids, completions, texts, repeats)
