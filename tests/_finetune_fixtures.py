"""Topical text for the fine-tuning tests (test_finetune, test_active, test_audit), and their tiny base model.

``fastft.data.toy_corpus`` draws every word of every sentence independently, so nothing
about a whole input is worth summarising, and a tiny masked-LM pretrained on it has a
[CLS] output that says little about the input. Here each document has one of two topics
and draws its content words mostly (``purity``) from that topic's half of the toy
grammar's word lists: predicting a masked word then pays for knowing the topic of the
rest of the input, so pretraining on these documents gives the tiny model features that
carry it, and classifying a sentence's topic is a task frozen features can read (like a
linear probe for a text's domain on a real pretrained model).
"""

import os
import random

import torch
import transformers
from _tiny_models import bert_config

TOKENIZERS = os.path.join(os.path.dirname(__file__), "data")

# The toy grammar's word lists (fastft/data/toy.py), split in two halves: one per topic.
TOPIC_WORDS = {
    "a": {"adjective": ["quick", "sleepy", "red", "enormous"], "noun": ["fox", "dog", "cat", "bird"],
          "verb": ["chases", "sees", "follows", "admires"]},
    "b": {"adjective": ["unbelievable", "tiny", "careful", "extraordinary"],
          "noun": ["elephant", "mountaineer", "scientist", "river"], "verb": ["photographs", "overtakes", "ignores"]},
}
ALL_WORDS = {kind: TOPIC_WORDS["a"][kind] + TOPIC_WORDS["b"][kind] for kind in ("adjective", "noun", "verb")}
DETERMINERS = ["the", "a", "every", "one"]


def topic_sentence(rng: random.Random, topic: str, purity: float = 0.8) -> str:
    """One toy-grammar sentence; each content word comes from ``topic``'s words with
    probability ``purity``, else from all words of its kind (either topic)."""

    def word(kind):
        return rng.choice(TOPIC_WORDS[topic][kind] if rng.random() < purity else ALL_WORDS[kind])

    def phrase():
        return f"{rng.choice(DETERMINERS)} {word('adjective')} {word('noun')}"

    return f"{phrase()} {word('verb')} {phrase()} ."


def topic_corpus(num_documents: int, seed: int, *, min_sentences: int = 2, max_sentences: int = 4) -> list[str]:
    """Unlabelled pretraining documents, each of 2-4 sentences on one random topic."""
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        topic = rng.choice(sorted(TOPIC_WORDS))
        documents.append(" ".join(topic_sentence(rng, topic) for _ in range(rng.randint(min_sentences, max_sentences))))
    return documents


def topic_rows(n: int, seed: int) -> list[dict]:
    """Single sentences labelled with the topic they were drawn from ("a" / "b"), exactly
    balanced and shuffled. About one content word in ten is from the other topic, so a
    sentence's label is a majority vote over its seven content words, not a keyword."""
    rng = random.Random(seed)
    topics = sorted(TOPIC_WORDS)
    rows = [{"text": topic_sentence(rng, topics[i % 2]), "label": topics[i % 2]} for i in range(n)]
    rng.shuffle(rows)
    return rows


def toy_bert_tokenizer():
    """The saved draw of the toy WordPiece tokenizer (tests/data; one draw for every process)."""
    return transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_bert_tokenizer"))


def save_tiny_bert_base(path, tokenizer) -> str:
    """A tiny masked-LM (1 layer, hidden 32) at seeded random initialisation, saved with its
    tokenizer as a base model directory at ``path``; returns ``str(path)``."""
    torch.manual_seed(0)
    transformers.BertForMaskedLM(bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def rare_class_rows(n: int, seed: int, rare: float) -> list[dict]:
    """Topic sentences whose topic is "b" with probability ``rare`` (active learning's task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = "b" if rng.random() < rare else "a"
        rows.append({"text": topic_sentence(rng, topic), "label": topic})
    return rows


CORE = {"a": ["dog", "fox"], "b": ["cat", "bird"]}
SPURIOUS = {("x", "a"): "red", ("x", "b"): "tiny", ("y", "a"): "tiny", ("y", "b"): "red"}


def biased_rows(n: int, seed: int, share_y: float) -> list[dict]:
    """The constructed biased task (Waterbirds-like, Sagawa et al. 2020): a sentence's topic is
    carried by three core words (each from the topic with probability 0.8) and a "spurious"
    adjective that, in group x (90% of the training rows), always goes with the topic (red: a,
    tiny: b) and in group y is reversed. Every word is one token (no length cue). Trained on
    the imbalanced rows the model leans on the adjective: x right, y mostly wrong. Balanced by
    group, the adjective predicts nothing and the core words carry both groups. Measured here
    (tiny BERT at random init, 3 initialisations): accuracy gap x - y 0.58 / 0.35 / 0.46
    unbalanced, 0.11 / 0.15 / 0.08 with balance_by="group"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        group, topic = ("y" if rng.random() < share_y else "x"), rng.choice("ab")
        other = "b" if topic == "a" else "a"

        def core():
            return rng.choice(CORE[topic if rng.random() < 0.8 else other])

        spurious = SPURIOUS[group, topic]
        text = (f"{rng.choice(['the', 'one', 'every'])} {spurious} {core()} {rng.choice(['admires', 'follows', 'ignores'])}"
                f" {core()} {spurious} {core()} .")
        rows.append({"text": text, "label": topic, "group": group})
    return rows
