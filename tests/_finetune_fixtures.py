"""Topical text for tests/test_finetune.py: documents that keep to one topic, as real text does.

``fastft.data.toy_corpus`` draws every word of every sentence independently, so nothing
about a whole input is worth summarising, and a tiny masked-LM pretrained on it has a
[CLS] output that says little about the input. Here each document has one of two topics
and draws its content words mostly (``purity``) from that topic's half of the toy
grammar's word lists: predicting a masked word then pays for knowing the topic of the
rest of the input, so pretraining on these documents gives the tiny model features that
carry it, and classifying a sentence's topic is a task frozen features can read (like a
linear probe for a text's domain on a real pretrained model).
"""

import random

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
