"""fastft.data: loading, tokenising, packing, collators (MLM 80/10/10, whole-word, CLM), NSP, sampler."""

import json
import math
import random

import datasets
import pytest
import torch

from fastft.data import (
    CausalLMCollator,
    EpochBatches,
    MaskedLMCollator,
    build_nsp_pairs,
    load_documents,
    pack_documents,
    prepare_lm_data,
    split_sentences,
    tokenize_documents,
    toy_corpus,
    toy_tokenizer,
)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def corpus():
    return toy_corpus(120, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return toy_tokenizer(corpus)


# ------------------------------------------------------------------------------ loading


def test_load_every_local_format(tmp_path):
    texts = ["first document here", "second one", "third, with a comma"]
    (tmp_path / "lines.txt").write_text("\n".join(texts[:2]) + "\n\n  \n" + texts[2] + "\n")
    (tmp_path / "paras.txt").write_text("a b\nc d\n\n\ne f\n\ng\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    datasets.Dataset.from_dict({"body": texts}).to_csv(str(tmp_path / "docs.csv"))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "docs.parquet"))

    assert load_documents(str(tmp_path / "lines.txt"))["text"] == texts  # blank lines dropped
    assert load_documents(str(tmp_path / "paras.txt"), txt_mode="paragraph")["text"] == ["a b\nc d", "e f", "g"]
    assert load_documents(str(tmp_path / "docs.jsonl"))["text"] == texts
    assert load_documents(str(tmp_path / "docs.csv"), text_column="body")["body"] == texts
    assert load_documents(str(tmp_path / "docs.parquet"))["text"] == texts
    assert load_documents(str(tmp_path / "doc*.jsonl"))["text"] == texts  # glob
    assert load_documents(texts + ["  "])["text"] == texts  # a list of texts
    with pytest.raises(ValueError, match="text_column"):
        load_documents(str(tmp_path / "docs.csv"))
    with pytest.raises(ValueError, match="txt_mode"):
        load_documents(texts, txt_mode="sentence")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="extension"):
        load_documents([str(tmp_path / "docs.csv"), str(tmp_path / "docs.jsonl")])


def test_tokenize_adds_end_tokens_and_workers_agree(corpus, tokenizer):
    docs = load_documents(corpus[:40])
    one = tokenize_documents(docs, tokenizer)
    two = tokenize_documents(docs, tokenizer, num_proc=2)
    assert one["input_ids"] == two["input_ids"]
    for text, ids in zip(docs["text"], one["input_ids"]):
        assert ids == tokenizer(text)["input_ids"]  # BERT style: [CLS] ... [SEP], nothing appended
    gpt = toy_tokenizer(corpus, kind="gpt")
    gpt_ids = tokenize_documents(docs, gpt)["input_ids"]
    for text, ids in zip(docs["text"], gpt_ids):  # GPT style: eos appended
        assert ids == gpt(text)["input_ids"] + [gpt.eos_token_id]
    truncated = tokenize_documents(docs, tokenizer, max_length=7)["input_ids"]
    assert max(map(len, truncated)) == 7 and all(ids[-1] == tokenizer.sep_token_id for ids in truncated)


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("block_size", [1, 7, 16, 113])
def test_packing_keeps_every_token_and_the_document_boundaries(block_size):
    rng = random.Random(block_size)
    lengths = [1, 7, 113, 2, 30, 1, 64, 5] * 3
    docs = [[rng.randrange(5, 100) for _ in range(n)] for n in lengths]
    packed = pack_documents(datasets.Dataset.from_dict({"input_ids": docs}), block_size, batch_size=10)
    # Independent oracle: blocks of each map batch (10 documents) cut from their stream.
    expected_blocks, expected_starts = [], []
    for first in range(0, len(docs), 10):
        group = docs[first : first + 10]
        stream = [t for d in group for t in d]
        doc_begins = [sum(map(len, group[:i])) for i in range(len(group))]
        for begin in range(0, len(stream), block_size):
            end = min(begin + block_size, len(stream))
            expected_blocks.append(stream[begin:end])
            expected_starts.append(sorted({0} | {s - begin for s in doc_begins if begin <= s < end}))
    assert packed["input_ids"] == expected_blocks
    assert packed["document_starts"] == expected_starts
    assert sum(len(b) != block_size for b in packed["input_ids"]) <= 3  # only each map batch's tail


def test_collator_boundaries_give_cu_seqlens_and_position_resets(tokenizer):
    examples = [
        {"input_ids": list(range(10, 20)), "document_starts": [0, 3, 8]},
        {"input_ids": list(range(10, 17)), "document_starts": [0, 6]},  # shorter: padded
    ]
    batch = CausalLMCollator(tokenizer, reset_position_ids=True)(examples)
    assert batch["input_ids"].shape == (2, 10)
    # row 0: segments [0,3) [3,8) [8,10); row 1: [0,6) [6,7) and padding [7,10)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 10, 16, 17, 20]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"] == 6
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 4, 5, 0, 0, 1, 2]]
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 3
    # causal-LM labels: unshifted copy of input_ids, padding ignored (the model shifts)
    expected = batch["input_ids"].clone()
    expected[1, 7:] = -100
    assert torch.equal(batch["labels"], expected)


# ------------------------------------------------------------------------------ masked-LM


def _random_blocks(tokenizer, rows, length, seed):
    rng = random.Random(seed)
    ordinary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    examples = []
    for _ in range(rows):
        n = rng.randint(length // 2, length)  # uneven lengths -> padding in the batch
        body = [rng.choice(ordinary) for _ in range(n - 2)]
        examples.append({"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]})
    return examples


def test_mlm_80_10_10_statistics_and_specials_never_masked(tokenizer):
    collator = MaskedLMCollator(tokenizer, seed=3)
    examples = _random_blocks(tokenizer, rows=256, length=129, seed=0)
    batch = collator(examples)
    original = CausalLMCollator(tokenizer)(examples)["input_ids"]
    labels, inputs, mask = batch["labels"], batch["input_ids"], batch["attention_mask"].bool()
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids)) | ~mask
    selected = labels != -100
    assert not (selected & special).any()  # [CLS], [SEP], padding never selected
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(inputs[~selected], original[~selected])  # unselected tokens untouched

    eligible = int((~special).sum())
    n = int(selected.sum())

    def within(observed, expected_p, trials):  # 5 binomial standard deviations
        return abs(observed - expected_p * trials) <= 5 * math.sqrt(trials * expected_p * (1 - expected_p))

    assert within(n, 0.15, eligible), (n, eligible)
    masked = int((inputs[selected] == tokenizer.mask_token_id).sum())
    unchanged = int((inputs[selected] == original[selected]).sum())
    randomised = n - masked - unchanged
    num_random_ids = len(tokenizer) - len(set(tokenizer.all_special_ids))
    assert within(masked, 0.8, n), masked
    # a random draw equal to the original token counts as unchanged
    assert within(unchanged, 0.1 + 0.1 / num_random_ids, n), unchanged
    assert within(randomised, 0.1 * (1 - 1 / num_random_ids), n), randomised
    random_ids = inputs[selected & (inputs != tokenizer.mask_token_id) & (inputs != original)]
    assert not torch.isin(random_ids, torch.tensor(tokenizer.all_special_ids)).any()


def test_mlm_collator_is_seeded_and_resumable(tokenizer):
    examples = _random_blocks(tokenizer, rows=8, length=33, seed=5)
    a, b = MaskedLMCollator(tokenizer, seed=11), MaskedLMCollator(tokenizer, seed=11)
    first = a(examples)
    assert torch.equal(first["labels"], b(examples)["labels"])
    state = a.state_dict()
    second = a(examples)
    assert not torch.equal(first["labels"], second["labels"])  # the stream moves on
    c = MaskedLMCollator(tokenizer, seed=0)
    c.load_state_dict(state)
    assert torch.equal(c(examples)["input_ids"], second["input_ids"])
    assert not torch.equal(MaskedLMCollator(tokenizer, seed=12)(examples)["labels"], first["labels"])


@pytest.mark.parametrize("source", ["word_ids", "wordpiece_hashes"])
def test_whole_word_masking_masks_whole_words(corpus, tokenizer, source):
    if source == "word_ids":
        data, collator = prepare_lm_data(corpus, tokenizer, "mlm", block_size=48, whole_word_mask=True, seed=2)
        assert "word_starts" in data.column_names
    else:  # no word_starts column: '##' continuation tokens decide
        data = pack_documents(tokenize_documents(load_documents(corpus), tokenizer), 48)
        collator = MaskedLMCollator(tokenizer, whole_word_mask=True, seed=2)
    examples = [data[i] for i in range(len(data))]
    batch = collator(examples)
    selected = batch["labels"] != -100
    words = selected_words = 0
    split_words = 0
    for row, example in enumerate(examples):
        tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
        start = 0
        for end in range(1, len(tokens) + 1):
            if end == len(tokens) or not tokens[end].startswith("##"):
                group = selected[row, start:end]
                assert bool(group.all()) or not bool(group.any()), tokens[start:end]  # all or nothing
                if tokens[start] not in tokenizer.all_special_tokens:
                    words += 1
                    selected_words += bool(group.any())
                    split_words += end - start > 1
                start = end
    assert split_words > 50  # the corpus really has multi-piece words
    assert abs(selected_words / words - 0.15) < 5 * math.sqrt(0.15 * 0.85 / words)
    assert "word_starts" not in batch


# ------------------------------------------------------------------------------ NSP


def test_nsp_pairs(tokenizer):
    docs = toy_corpus(150, min_sentences=3, max_sentences=6, seed=4)
    pairs = build_nsp_pairs(load_documents(docs), tokenizer, max_length=40, seed=0)
    labels = pairs["next_sentence_label"]
    assert 0.4 < sum(labels) / len(labels) < 0.75  # 50% random, plus documents' last sentences
    sentences = {tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for d in docs for s in split_sentences(d)}
    for ids, types, label in zip(pairs["input_ids"], pairs["token_type_ids"], labels):
        assert len(ids) <= 40 and len(ids) == len(types)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        first_sep = ids.index(tokenizer.sep_token_id)
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        b = ids[first_sep + 1 : -1]
        assert b
    # a true pair's B starts with the sentence that follows A's last sentence in its document
    doc_sentences = [[tokenizer(s, add_special_tokens=False)["input_ids"] for s in split_sentences(d)] for d in docs]
    true_pairs = [(ids, ids.index(tokenizer.sep_token_id)) for ids, label in zip(pairs["input_ids"], labels) if label == 0]
    assert true_pairs
    for ids, sep in true_pairs[:50]:
        a, b = ids[1:sep], ids[sep + 1 : -1]
        found = any(
            a[-len(doc[k]) :] == doc[k] and b[: len(doc[k + 1])] == doc[k + 1][: len(b)]
            for doc in doc_sentences
            for k in range(len(doc) - 1)
        )
        assert found
    assert sentences  # the corpus produced sentences
    batch = MaskedLMCollator(tokenizer)([pairs[i] for i in range(5)])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["next_sentence_label"].tolist() == labels[:5]


# ------------------------------------------------------------------------------ sampler


def test_epoch_batches_are_deterministic_and_resumable():
    sampler = EpochBatches(23, 4, seed=7)
    assert len(sampler) == 6
    epoch0 = list(sampler.batches(0))
    assert sorted(i for b in epoch0 for i in b) == list(range(23)) and len(epoch0[-1]) == 3
    assert epoch0 == list(EpochBatches(23, 4, seed=7).batches(0))
    assert epoch0 != list(sampler.batches(1))  # a new order every epoch
    assert list(sampler.batches(0, start=4)) == epoch0[4:]
    assert len(EpochBatches(23, 4, drop_last=True)) == 5
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches(3, 0)
