"""``fastft demo``: the built-in language's guarantees, the pipeline on a reduced
configuration (same code path, fewer steps), and a run on user files."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter

import pytest
import torch

from fastft.data.demo_language import FUNCTION_WORDS, SPECIAL_TOKENS, DemoLanguage
from fastft.recipes.demo import SCRATCH, DemoConfig, build_word_tokenizer, main, run_demo, split_rows

from _tiny_models import bert_config  # tests/_tiny_models.py


@pytest.fixture
def one_thread():
    """The demo's matrices are 64 wide: one thread is as fast on an idle machine and far
    faster on a busy one (like ``fastft demo``'s default ``--threads 1``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _words(rows, column):
    return {w for r in rows for w in r[column].split()}


@pytest.mark.parametrize("language", [DemoLanguage(), DemoLanguage(num_classes=3, words_per_class=7, seen_per_class=2, seed=5)])
def test_language_held_out_words_never_in_labelled_training_set(language):
    train = language.labelled(61, "train")
    validation = language.labelled(23, "validation")
    test = language.labelled(113, "test")
    seen_side = _words(train, "text") | _words(train, "text_pair") | _words(validation, "text") | _words(validation, "text_pair")
    test_words = _words(test, "text") | _words(test, "text_pair")
    content = lambda words: {w for w in words if language.class_of(w) is not None}  # noqa: E731
    assert content(test_words), "the test set has content words"
    assert not content(test_words) & content(seen_side), "a test word appears in the labelled training/validation set"
    unseen = set(language.word_indices("test"))
    assert all(int(w.split("_")[1]) in unseen for w in content(test_words))
    assert all(int(w.split("_")[1]) not in unseen for w in content(seen_side))
    # every test word is taught by unlabeled text
    assert content(test_words) <= content({w for doc in language.unlabeled(500) for w in doc.split()})


@pytest.mark.parametrize("num_docs", [1, 7, 64, 113])
def test_language_classes_balanced_and_label_is_first_segment(num_docs):
    language = DemoLanguage(content_rate=1.0, noise_rate=0.0, seed=3)
    for split in ("train", "validation", "test"):
        rows = language.labelled(num_docs, split)
        counts = Counter(r["label"] for r in rows)
        assert sum(counts.values()) == num_docs
        assert max(counts.values()) - min(counts.get(c, 0) for c in range(language.num_classes)) <= 1
        for row in rows:  # without noise: every word of text is of the label's class, none of text_pair
            assert {language.class_of(w) for w in row["text"].split()} == {row["label"]}
            assert row["label"] not in {language.class_of(w) for w in row["text_pair"].split()}


def test_language_is_deterministic_and_seeded():
    assert DemoLanguage(seed=1).unlabeled(20) == DemoLanguage(seed=1).unlabeled(20)
    assert DemoLanguage(seed=1).unlabeled(20) != DemoLanguage(seed=2).unlabeled(20)
    assert DemoLanguage(seed=1).labelled(9, "test") == DemoLanguage(seed=1).labelled(9, "test")
    with pytest.raises(ValueError, match="seen_per_class"):
        DemoLanguage(words_per_class=4, seen_per_class=4)
    with pytest.raises(ValueError, match="split"):
        DemoLanguage().labelled(4, "dev")


def test_word_tokenizer_maps_every_word_to_its_own_id():
    language = DemoLanguage(num_classes=2, words_per_class=5, seen_per_class=1)
    tokenizer = build_word_tokenizer(language.vocabulary)
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(FUNCTION_WORDS) + 10
    text = language.unlabeled(1)[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == text.split()
    assert tokenizer.unk_token_id not in ids


def test_split_rows_keeps_every_row_once():
    train, test, validation = split_rows(list(range(113)), seed=0, fractions=(0.2, 0.1))
    assert sorted(train + test + validation) == list(range(113))
    assert (len(test), len(validation)) == (23, 11)
    with pytest.raises(ValueError, match="too few"):
        split_rows([1, 2], seed=0, fractions=(0.2, 0.1))


def test_demo_pipeline_reduced(tmp_path, one_thread):
    """The default code path with fewer steps: pretraining must make full fine-tuning
    clearly beat the same architecture trained from scratch on held-out words."""
    # a smaller vocabulary (12 words a class) is learnt in fewer steps; the rest is the default path
    config = DemoConfig(
        language=DemoLanguage(words_per_class=12, seen_per_class=3), num_unlabeled=2000, num_heldout_unlabeled=64,
        num_validation=32, num_test=120, pretrain_steps=400, epochs=12, strategies=("full", "features"),
    )
    result = run_demo(config, str(tmp_path / "out"), device="cpu", seed=0, log=lambda *a: None)
    runs = [r["run"] for r in result.rows]
    assert runs == ["full", "features", SCRATCH]
    by_run = {r["run"]: r for r in result.rows}
    for row in result.rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0 < row["trainable_params"] <= row["total_params"]
        assert row["wall_s"] > 0 and row["cpu_s"] > 0
        assert len(result.curves[row["run"]]) == config.epochs
    assert by_run["features"]["trainable_params"] < 0.05 * by_run["features"]["total_params"]
    # before = the pretrained model on held-out text = pretraining's last evaluation (same masks)
    assert by_run["full"]["perplexity_before"] == pytest.approx(result.pretraining["heldout_perplexity"], rel=1e-4)
    assert by_run["features"]["perplexity_after"] == pytest.approx(by_run["features"]["perplexity_before"], rel=1e-5)
    assert by_run[SCRATCH]["perplexity_before"] is None and "n/a" in result.table
    # the two-stage effect
    assert by_run["full"]["test_accuracy"] >= by_run[SCRATCH]["test_accuracy"] + 0.3, result.table
    assert by_run[SCRATCH]["test_accuracy"] <= result.chance + 0.15, result.table
    # outputs
    for name in ("table", "metrics", "plot"):
        assert os.path.getsize(result.files[name]) > 0
    with open(result.files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result.files["metrics"]) as f:
        saved = json.load(f)
    assert [r["run"] for r in saved["rows"]] == runs and saved["seed"] == 0
    assert saved["pretraining"]["loss_curve"]["loss"], "pretraining loss curve recorded"
    assert "| pretrained + full |" in result.table


def _write_user_files(root):
    """A tiny random BERT (+ tokenizer) on disk, unlabeled text, a labelled CSV."""
    import transformers

    from fastft.data.toy import toy_corpus, toy_tokenizer

    texts = toy_corpus(60, seed=1)
    tokenizer = toy_tokenizer(texts, vocab_size=120)
    torch.manual_seed(0)
    config = bert_config(len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64, dropout=0.1)
    model_dir = root / "tiny-bert"
    transformers.BertForMaskedLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "unlabeled.txt"
    data.write_text("\n".join(texts[:40]) + "\n\n")
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for text in texts[40:]:
            writer.writerow({"text": text, "label": "fox" if "fox" in text else "other"})
    return model_dir, data, labels


def test_demo_on_user_model_and_files(tmp_path, monkeypatch, capsys, one_thread):
    model_dir, data, labels = _write_user_files(tmp_path)
    small = dataclasses.replace(DemoConfig(), pretrain_steps=3, epochs=1, pretrain_batch_size=4, batch_size=4)
    monkeypatch.setattr("fastft.recipes.demo.DemoConfig", lambda: small)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(data), "--labels", str(labels), "--out", str(out),
                 "--device", "cpu", "--seed", "3", "--threads", str(torch.get_num_threads())]) == 0
    printed = capsys.readouterr().out
    assert "| pretrained + LoRA |" in printed and "| from scratch (same architecture) |" in printed
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert [r["run"] for r in saved["rows"]] == ["full", "features", "lora", "gradual-unfreeze", SCRATCH]
    assert saved["rows"][0]["total_params"] == saved["rows"][-1]["total_params"], "scratch uses the same architecture"
    assert os.path.isfile(out / "curves.png") and os.path.isfile(out / "results.md")
    # 20 labelled rows: 4 test, 2 validation, 14 train
    assert "on 4 test documents" in saved["table"]


def test_demo_user_mode_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="--labels"):
        run_demo(DemoConfig(), str(tmp_path), data=["x.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match="label"):
        run_demo(DemoConfig(), str(tmp_path), labels=str(bad))
