"""The demo's built-in language: a corpus where pretraining teaches what labels need.

Generator (documented in the README). The vocabulary has ``num_classes`` latent word
classes of ``words_per_class`` content words each (``w0_3`` is word 3 of class 0), plus
12 function words. A sentence is about one class: each word is a content word of that
class with probability ``content_rate`` (else a function word), and a content word comes
from another class with probability ``noise_rate``. An unlabeled document is 1-2
sentences about one class. So *which words belong together* is learnable only from how
they co-occur in unlabeled text: masked-LM must infer the document's class from the
visible words to predict a masked one. Word names carry nothing a model can use: the
tokenizer maps each word to an arbitrary id.

The labelled task: a sentence (``text``) and a distractor sentence about another class
(``text_pair``); the label is the class of the first. Its small training (and validation)
set is written with only the first ``seen_per_class`` words of each class, noise and
distractors included; the held-out test set only with the *other* words. A model trained
from scratch on the labels has never seen a test word and is at chance; a model pretrained
on the unlabeled text knows which class each unseen word co-occurs with, so fine-tuning
carries over — the gap comes from what pretraining learned, not from how the metric was
built. The distractor makes the task need more than the frozen features: telling which
segment's class counts is learnt during fine-tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["FUNCTION_WORDS", "SPECIAL_TOKENS", "DemoLanguage"]

FUNCTION_WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "with", "on"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPLITS = ("train", "validation", "test")


@dataclass
class DemoLanguage:
    """The generator's knobs; every method is deterministic given ``seed``.

    num_classes: latent word classes = labels of the task (chance accuracy 1/num_classes).
    words_per_class: content words per class (all of them appear in unlabeled text).
    seen_per_class: of those, how many the labelled training / validation sets use.
    sentence_len: (min, max) words per sentence.
    content_rate: share of a sentence's words that are content (not function) words.
    noise_rate: share of content words drawn from another class than the document's.
    """

    num_classes: int = 4
    words_per_class: int = 24
    seen_per_class: int = 6
    sentence_len: tuple[int, int] = (6, 12)
    content_rate: float = 0.8
    noise_rate: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 1 <= self.seen_per_class < self.words_per_class:
            raise ValueError(
                f"seen_per_class must be in [1, words_per_class), got {self.seen_per_class} (words_per_class "
                f"{self.words_per_class}): the test set needs words the labelled set never uses"
            )
        if not 1 <= self.sentence_len[0] <= self.sentence_len[1]:
            raise ValueError(f"sentence_len must be (min, max) with 1 <= min <= max, got {self.sentence_len}")
        for name in ("content_rate", "noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def word(self, cls: int, index: int) -> str:
        return f"w{cls}_{index}"

    @property
    def vocabulary(self) -> list[str]:
        """Special tokens, function words, then every content word (the tokenizer's ids)."""
        words = [self.word(c, i) for c in range(self.num_classes) for i in range(self.words_per_class)]
        return SPECIAL_TOKENS + FUNCTION_WORDS + words

    def word_indices(self, split: str) -> list[int]:
        """Indices (within each class) of the content words a labelled split may use:
        train / validation the first ``seen_per_class``, test the rest."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test":
            return list(range(self.seen_per_class, self.words_per_class))
        return list(range(self.seen_per_class))

    def class_of(self, word: str) -> int | None:
        """The latent class of a content word (None for function words and specials)."""
        if word.startswith("w") and "_" in word:
            return int(word[1:].split("_")[0])
        return None

    def _sentence(self, rng: random.Random, cls: int, word_indices: list[int]) -> str:
        tokens = []
        for _ in range(rng.randint(*self.sentence_len)):
            if rng.random() < self.content_rate:
                if rng.random() < self.noise_rate:  # a word of another class, from the same pool
                    other = (cls + rng.randrange(1, self.num_classes)) % self.num_classes
                    tokens.append(self.word(other, rng.choice(word_indices)))
                else:
                    tokens.append(self.word(cls, rng.choice(word_indices)))
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
        """``{"text", "text_pair", "label"}`` rows, classes balanced (``num_docs //
        num_classes`` each, the remainder to the first classes), shuffled.

        ``text`` is a sentence about class ``label``; ``text_pair`` a distractor sentence
        about another class, so the label is the class of the *first* segment. ``split``:
        "train" / "validation" use only the seen words, "test" only the unseen ones (see
        ``word_indices``)."""
        indices = self.word_indices(split)
        rng = random.Random(self.seed * 1000 + seed_offset + 7 * SPLITS.index(split))
        rows = []
        for i in range(num_docs):
            cls = i % self.num_classes  # balanced classes: chance accuracy is 1 / num_classes
            distractor = (cls + rng.randrange(1, self.num_classes)) % self.num_classes
            rows.append({"text": self._sentence(rng, cls, indices), "text_pair": self._sentence(rng, distractor, indices),
                         "label": cls})
        rng.shuffle(rows)
        return rows
