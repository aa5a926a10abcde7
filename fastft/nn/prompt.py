"""``PromptEmbedding``: soft prompt tuning (Lester et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn

__all__ = ["PromptEmbedding"]


class PromptEmbedding(nn.Module):
    r"""Trainable soft prompt (Lester, Al-Rfou & Constant 2021, "The Power of Scale for
    Parameter-Efficient Prompt Tuning", arXiv:2104.08691).

    ``p`` vectors ``P ∈ R^{p × d}`` are prepended to a frozen model's input embeddings:

    .. math::

        E' = [\,P;\ E(x)\,] \in \mathbb{R}^{(p + n) \times d}

    and only ``P`` trains (``p · d`` parameters). Lester et al. found initialising ``P``
    from real token embeddings far better than random vectors: either embeddings of
    tokens drawn at random from the vocabulary (they sampled the 5,000 most frequent;
    fastft samples uniformly, having no frequencies) or the embeddings of a text describing
    the task (e.g. the class names), repeated or truncated to ``p`` tokens.

    Args:
        num_virtual_tokens: ``p >= 1``.
        word_embeddings: the model's input embedding ``(vocab, d)``; it is only read, to
            initialise ``P`` (and never stored, so it is not duplicated in the state dict).
        init_token_ids: token ids of the initialisation text (``len >= 1``); None draws
            ``p`` random vocabulary rows.
        generator: optional ``torch.Generator`` for the random draw.

    Shapes:
        ``forward(batch_size)`` → ``(batch_size, p, d)`` (a broadcast view of ``P``).

    Raises:
        ValueError: ``p < 1``, empty ``init_token_ids`` or ids outside the vocabulary.
        TypeError: ``word_embeddings`` is not an ``nn.Embedding``.
    """

    def __init__(self, num_virtual_tokens: int, word_embeddings: nn.Embedding,
                 init_token_ids: Optional[Union[Sequence[int], torch.Tensor]] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}")
        if not isinstance(word_embeddings, nn.Embedding):
            raise TypeError(f"word_embeddings must be nn.Embedding, got {type(word_embeddings).__name__}")
        vocab_size, hidden_size = word_embeddings.weight.shape
        if init_token_ids is None:
            token_ids = torch.randint(0, vocab_size, (num_virtual_tokens,), generator=generator)
            self.init = "random vocabulary"
        else:
            token_ids = torch.as_tensor(init_token_ids, dtype=torch.long).flatten()
            if token_ids.numel() == 0:
                raise ValueError("init_token_ids is empty: give the token ids of a non-empty text")
            if bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
                raise ValueError(f"init_token_ids must be in [0, {vocab_size}), got {token_ids.tolist()}")
            # Repeat the text to fill p slots, or truncate it (PEFT does the same).
            repeats = -(-num_virtual_tokens // token_ids.numel())
            token_ids = token_ids.repeat(repeats)[:num_virtual_tokens]
            self.init = "text"
        with torch.no_grad():
            initial = word_embeddings.weight[token_ids.to(word_embeddings.weight.device)].detach().clone()  # (p, d)
        self.num_virtual_tokens = num_virtual_tokens
        self.hidden_size = hidden_size
        self.prompt = nn.Parameter(initial)  # (p, d)

    def forward(self, batch_size: int) -> torch.Tensor:
        """The soft prompt for a batch: ``(batch_size, p, d)``."""
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)  # (B, p, d)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}, init={self.init}"
