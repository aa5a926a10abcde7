"""The demo's built-in language: a corpus where pretraining teaches what labels need.

Generator (documented in the README). The vocabulary has ``num_classes`` latent word
classes of ``words_per_class`` content words each (``w0_3`` is word 3 of class 0), plus
a few function words. A document picks one class and writes sentences whose content words
all come from that class, padded with function words, with a small rate of noise words
from other classes. So *which words belong together* is learnable only from how they
co-occur in unlabeled text — masked-LM must infer the document's class from the visible
words to predict a masked one.

The labelled task is "which class is this document about". Its small training set is
written with only the first ``seen_per_class`` words of each class; the held-out test set
only with the *other* words. A model trained from scratch on the labels has never seen a
test word and is at chance; a model pretrained on the unlabeled text knows which class
each unseen word co-occurs with, so fine-tuning carries over — the gap comes from what
pretraining learned, not from how the metric was built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FUNCTION_WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "with", "on"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class DemoLanguage:
    num_classes: int = 4
    words_per_class: int = 24
    seen_per_class: int = 6
    sentence_len: tuple[int, int] = (6, 12)
    content_rate: float = 0.6
    noise_rate: float = 0.05
    seed: int = 0

    def word(self, cls: int, index: int) -> str:
        return f"w{cls}_{index}"

    @property
    def vocabulary(self) -> list[str]:
        words = [self.word(c, i) for c in range(self.num_classes) for i in range(self.words_per_class)]
        return SPECIAL_TOKENS + FUNCTION_WORDS + words

    def _sentence(self, rng: random.Random, cls: int, word_indices: list[int]) -> str:
        tokens = []
        for _ in range(rng.randint(*self.sentence_len)):
            if rng.random() < self.content_rate:
                other = rng.random() < self.noise_rate
                c = rng.randrange(self.num_classes) if other else cls
                pool = range(self.words_per_class) if other else word_indices
                tokens.append(self.word(c, rng.choice(list(pool))))
            else:
                tokens.append(rng.choice(FUNCTION_WORDS))
        return " ".join(tokens)

    def unlabeled(self, num_docs: int, seed_offset: int = 0) -> list[str]:
        """Pretraining text: one document (1-2 sentences) per line, every word of a class."""
        rng = random.Random(self.seed * 1000 + seed_offset)
        every = list(range(self.words_per_class))
        return [" ".join(self._sentence(rng, rng.randrange(self.num_classes), every)
                         for _ in range(rng.randint(1, 2))) for _ in range(num_docs)]

    def labelled(self, num_docs: int, split: str, seed_offset: int = 1) -> list[dict]:
        """{"text", "label"} rows; split "train" uses only the seen words, "test" only the unseen."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        seen = list(range(self.seen_per_class))
        unseen = list(range(self.seen_per_class, self.words_per_class))
        rng = random.Random(self.seed * 1000 + seed_offset + (0 if split == "train" else 7))
        rows = []
        for i in range(num_docs):
            cls = i % self.num_classes  # balanced classes: chance accuracy is 1 / num_classes
            text = self._sentence(rng, cls, seen if split == "train" else unseen)
            rows.append({"text": text, "label": cls})
        rng.shuffle(rows)
        return rows
