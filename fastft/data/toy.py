"""A generated corpus and a tokenizer trained on it: tests and demos without downloads.

The corpus follows a small grammar (``the quick fox chases a sleepy dog .``), so a tiny
model's loss drops quickly, and contains long words that WordPiece splits into
``##`` pieces (whole-word masking has something to group).
"""

from __future__ import annotations

import random

__all__ = ["toy_corpus", "toy_tokenizer"]

_ADJECTIVES = ["quick", "sleepy", "red", "enormous", "unbelievable", "tiny", "careful", "extraordinary"]
_NOUNS = ["fox", "dog", "cat", "bird", "elephant", "mountaineer", "scientist", "river"]
_VERBS = ["chases", "sees", "follows", "admires", "photographs", "overtakes", "ignores"]
_DETERMINERS = ["the", "a", "every", "one"]


def _sentence(rng: random.Random) -> str:
    def phrase():
        return f"{rng.choice(_DETERMINERS)} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"

    return f"{phrase()} {rng.choice(_VERBS)} {phrase()} ."


def toy_corpus(num_documents: int = 200, *, min_sentences: int = 1, max_sentences: int = 4, seed: int = 0) -> list[str]:
    """``num_documents`` documents of ``min_sentences``..``max_sentences`` sentences each."""
    rng = random.Random(seed)
    return [
        " ".join(_sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences))) for _ in range(num_documents)
    ]


def toy_tokenizer(corpus: list[str] | None = None, *, kind: str = "bert", vocab_size: int = 150):
    """A ``PreTrainedTokenizerFast`` trained on ``corpus`` (default: ``toy_corpus()``).

    ``kind="bert"``: WordPiece, lower-casing, ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]``
    templates, ``[PAD] [UNK] [CLS] [SEP] [MASK]``. ``kind="gpt"``: the same model but no
    template and an end-of-text token ``[EOS]`` (also used as bos), like GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("bert", "gpt"):
        raise ValueError(f"kind must be 'bert' or 'gpt', got {kind!r}")
    corpus = toy_corpus() if corpus is None else corpus
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["[PAD]", "[UNK]", "[EOS]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    if kind == "bert":
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=512,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
        bos_token="[EOS]",
        model_max_length=512,
    )
