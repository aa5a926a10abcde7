"""Evaluation beyond the average (fastft/audit/, issue 19): slices with bootstrap intervals
and bias gaps, the counterfactual term-swap probe, calibration (ECE, temperature scaling
saved in the bundle), out-of-distribution detection (MSP / energy AUROC, FPR@95%TPR),
group-balanced fine-tuning, and ``fastft eval --slice-by / --ood / --calibration /
--swap-terms`` with its bad inputs.

Every number is checked against a direct computation written here (explicit loops, pairwise
counts, a normal-approximation interval, a known temperature), never against the code's
own helpers. Models: a tiny BERT (1 layer, hidden 32) from random initialisation, fine-tuned
here in about a second per run: topic sentences (tests/_finetune_fixtures.py) are
learnable from a few dozen rows even without pretraining.
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import transformers
from _finetune_fixtures import biased_rows, save_tiny_bert_base, topic_rows, toy_bert_tokenizer

import fastft
from fastft import cli
from fastft.audit import (
    ReweightedClassificationObjective,
    audit,
    auroc,
    balance_weights,
    balanced_rows,
    counterfactual_probe,
    energy_score,
    expected_calibration_error,
    fit_temperature,
    fpr_at_tpr,
    msp_score,
    nll,
    read_swap_terms,
    slice_metrics,
    slice_table,
    slice_values,
    swap_terms,
)
from fastft.finetuning import load_finetuned
from fastft.finetuning.metrics import macro_f1
from fastft.recipes.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(progress=False, plot=False, fused=False, batch_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return toy_bert_tokenizer()


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    """A tiny masked-LM at random initialisation, saved as a base model directory."""
    return save_tiny_bert_base(tmp_path_factory.mktemp("base") / "base", tokenizer)


@pytest.fixture(scope="module")
def topic_run(base, tokenizer, tmp_path_factory):
    """The topic task fine-tuned with a temperature fitted on validation: (result, data)."""
    data = {"train": topic_rows(80, 1), "validation": topic_rows(80, 2)}
    out = tmp_path_factory.mktemp("topic") / "run"
    result = finetune(base, tokenizer, data, output_dir=str(out), epochs=6, lr=1e-2, calibrate=True, **QUIET)
    return result, data


def direct_logits(model, tokenizer, texts) -> torch.Tensor:
    """The classifier's logits, one row at a time through the Hugging Face forward."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.float() for t in texts])


# ------------------------------------------------------------------ calibration


def test_ece_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([0.6, 0.6, 0.6], size=700)
    labels = np.array([rng.choice(3, p=p ** 2 / (p ** 2).sum()) for p in probabilities])  # over-confident
    result = expected_calibration_error(probabilities, labels, n_bins=10)
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    direct = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = [i for i in range(len(labels)) if (lo < confidence[i] <= hi) or (b == 0 and confidence[i] == 0)]
        if inside:
            accuracy = sum(predicted[i] == labels[i] for i in inside) / len(inside)
            mean_confidence = sum(confidence[i] for i in inside) / len(inside)
            direct += len(inside) / len(labels) * abs(accuracy - mean_confidence)
    assert result.ece == pytest.approx(direct, abs=1e-12)
    assert result.count.sum() == len(labels) and result.ece > 0.02  # the labels are drawn less sharply: miscalibrated
    with pytest.raises(ValueError, match="no rows"):
        expected_calibration_error(np.zeros((0, 3)), np.zeros(0))


def test_temperature_scaling_recovers_a_known_temperature():
    """Labels drawn from softmax(s), logits 3·s: the fitted temperature is ~3, the NLL at it is
    the lowest of a fine grid, and it lowers the ECE without changing any prediction."""
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(6000, 4, generator=generator) * 1.5
    labels = torch.multinomial(s.softmax(-1), 1, generator=generator)[:, 0]
    logits = 3.0 * s
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 400))
    assert nll(logits, labels, temperature) <= min(nll(logits, labels, t) for t in grid) + 1e-9
    direct_nll = float(-(logits / temperature).log_softmax(-1).gather(1, labels[:, None]).double().mean())
    assert nll(logits, labels, temperature) == pytest.approx(direct_nll, rel=1e-6)
    before = expected_calibration_error(logits.softmax(-1), labels).ece
    after = expected_calibration_error((logits / temperature).softmax(-1), labels).ece
    assert after < 0.3 * before, (before, after)


def test_the_bundle_keeps_the_temperature_and_predict_returns_calibrated_probabilities(topic_run, tokenizer):
    result, data = topic_run
    texts = [r["text"] for r in data["validation"]]
    labels = [result.task.label_id(r["label"]) for r in data["validation"]]
    logits = direct_logits(result.model, tokenizer, texts)
    assert result.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    assert result.temperature != pytest.approx(1.0, abs=0.05)  # a tiny model trained 6 epochs is not calibrated
    with open(os.path.join(result.save_path, "fastft_finetune.json")) as f:
        assert json.load(f)["temperature"] == pytest.approx(result.temperature)
    model, _, task = load_finetuned(result.save_path)
    assert task.temperature == pytest.approx(result.temperature)
    outputs = fastft.predict(result.save_path, texts[:12], scores=True)
    expected = (direct_logits(model, tokenizer, texts[:12]) / result.temperature).softmax(-1)
    for output, row in zip(outputs, expected):
        assert [output["probabilities"][str(label)] for label in task.labels] == pytest.approx(row.tolist(), abs=1e-5)
        assert output["label"] == task.labels[int(row.argmax())]  # the same class as without a temperature


# ------------------------------------------------------------------ out-of-distribution detection


def test_auroc_and_fpr_at_95_match_pairwise_counts():
    rng = np.random.default_rng(1)
    inside = np.round(rng.normal(1.0, 1.0, 120), 1)  # rounded: ties between the two sides
    outside = np.round(rng.normal(0.0, 1.0, 90), 1)
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in inside for b in outside]
    assert auroc(inside, outside) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    # the highest threshold keeping >= 95% of the inside scores, then the share of outside ones kept
    threshold = max(t for t in inside if (inside >= t).mean() >= 0.95)
    assert fpr_at_tpr(inside, outside) == pytest.approx((outside >= threshold).mean())
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert msp_score(logits) == pytest.approx([math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0.5)), 1 / 3])
    assert energy_score(logits) == pytest.approx([math.log(math.exp(2) + math.exp(-1) + math.exp(0.5)), math.log(3)])
    with pytest.raises(ValueError, match="both kinds"):
        auroc(inside, [])


class BagOfWords(torch.nn.Module):
    """A transparent classifier for the OOD test: logit_a = -logit_b = the number of topic-a
    words minus topic-b words (tests/_finetune_fixtures.py's word lists). A row without a
    word of either topic has no evidence: logits 0, MSP 1/2, the lowest energy score."""

    def __init__(self, tokenizer):
        super().__init__()
        from _finetune_fixtures import TOPIC_WORDS

        vote = torch.zeros(len(tokenizer))
        for topic, sign in (("a", 1.0), ("b", -1.0)):
            for words in TOPIC_WORDS[topic].values():
                for word in words:
                    vote[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word)[0])] = sign
        self.vote = torch.nn.Parameter(vote, requires_grad=False)
        self.config = transformers.PretrainedConfig(num_labels=2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        evidence = (self.vote[input_ids] * attention_mask).sum(-1)  # (B,)
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=torch.stack([evidence, -evidence], -1))


def test_ood_auroc_is_near_one_on_a_shifted_set_and_near_half_on_an_in_distribution_split(topic_run, tokenizer):
    """Detection through the whole audit path: on a model whose evidence is known (``BagOfWords``),
    rows of letters that are no word of the task are told apart from topic sentences (AUROC ~1,
    FPR@95 ~0) while another split of the same sentences is not (AUROC ~0.5, the null's
    standard deviation here being 0.04). The fine-tuned tiny model, whose scores on inputs
    unlike its training are arbitrary (measured: AUROC 0.01-0.99 over initialisations on such
    letter rows), must still score a same-distribution split at chance."""
    from fastft.finetuning import ClassificationTask

    rng = random.Random(5)
    shifted = [{"text": " ".join(rng.choice("qwxkvyz") for _ in range(12))} for _ in range(100)]
    sets = {"test": topic_rows(100, 21), "same": topic_rows(100, 22), "shifted": shifted}
    task = ClassificationTask(labels=["a", "b"])
    report = audit(BagOfWords(tokenizer), sets, tokenizer=tokenizer, task=task, ood=["same", "shifted"],
                   calibration=False)
    assert report.columns["test"]["accuracy"] > 0.9  # the evidence is the topic
    for score in ("msp", "energy"):
        assert report.columns["shifted"][f"{score}_auroc"] > 0.99, report.table()
        assert report.columns["shifted"][f"{score}_fpr95"] < 0.05, report.table()
        assert abs(report.columns["same"][f"{score}_auroc"] - 0.5) < 0.12, report.table()
    assert "shifted (OOD)" in report.table() and report.in_distribution == "test"

    result, _ = topic_run
    fine_tuned = audit(result, sets, ood=["same", "shifted"], calibration=False)
    for score in ("msp", "energy"):
        assert abs(fine_tuned.columns["same"][f"{score}_auroc"] - 0.5) < 0.12, fine_tuned.table()


# ------------------------------------------------------------------ slices and gaps


def _constructed(seed=0):
    """Predictions / labels of four slices: a (400 rows, 90% right), b (100, 70%), c (10: small),
    and 6 rows without the column."""
    rng = np.random.default_rng(seed)
    rows, predictions, references = [], [], []
    for group, n, right in (("a", 400, 0.9), ("b", 100, 0.7), ("c", 10, 0.5), (None, 6, 0.5)):
        for _ in range(n):
            y = int(rng.integers(2))
            predictions.append(y if rng.random() < right else 1 - y)
            references.append(y)
            rows.append({} if group is None else {"group": group})
    return rows, predictions, references


def test_slice_metrics_and_intervals_match_direct_computations():
    rows, predictions, references = _constructed()
    groups = slice_values(rows, "group")
    report = slice_metrics(predictions, references, groups, num_classes=2, column="group", positive=1,
                           n_bootstrap=2000, seed=0)
    assert list(report.slices) == ["overall", "a", "b", "c", "missing"] and report.missing == 6
    for name, entry in report.slices.items():
        keep = [i for i, g in enumerate(groups) if name == "overall" or g == name]
        p, r = [predictions[i] for i in keep], [references[i] for i in keep]
        accuracy = sum(a == b for a, b in zip(p, r)) / len(keep)
        assert entry["count"] == len(keep) and entry["small"] == (len(keep) < 30)
        assert entry["accuracy"] == pytest.approx(accuracy) and entry["macro_f1"] == pytest.approx(macro_f1(p, r))
        lo, hi = entry["accuracy_ci"]
        assert lo <= accuracy <= hi
        if len(keep) >= 100:  # the percentile bootstrap agrees with the normal approximation there
            half = 1.96 * math.sqrt(accuracy * (1 - accuracy) / len(keep))
            assert lo == pytest.approx(accuracy - half, abs=0.02) and hi == pytest.approx(accuracy + half, abs=0.02)
    width = {n: e["accuracy_ci"][1] - e["accuracy_ci"][0] for n, e in report.slices.items()}
    assert width["a"] < width["b"] < width["c"]  # ~ sqrt(p (1 - p) / n): 400, 100, 10 rows
    worst = min(("a", "b", "c", "missing"), key=lambda n: report.slices[n]["accuracy"])
    assert report.worst_slice == worst
    gaps = {n: report.slices[n]["accuracy"] - report.slices["overall"]["accuracy"] for n in ("a", "b", "c", "missing")}
    assert report.largest_gap == (max(gaps, key=lambda n: abs(gaps[n])), pytest.approx(gaps[max(gaps, key=lambda n: abs(gaps[n]))]))
    again = slice_metrics(predictions, references, groups, num_classes=2, column="group", positive=1, n_bootstrap=2000)
    assert again.slices == report.slices  # seeded
    text = report.table()
    assert "| c | 10 |" in text and "small" in text and "6 row(s) without 'group'" in text


def test_parity_and_opportunity_gaps_on_a_constructed_biased_set():
    """Group a: positive rate 0.6, true-positive rate 0.9; group b: 0.3 and 0.5 (built exactly)."""
    predictions, references, groups = [], [], []
    for group, positives_predicted, true_positives in (("a", 60, 45), ("b", 30, 25)):
        # 100 rows: 50 with label 1, of which `true_positives` predicted 1; the rest of the
        # predicted positives are label-0 rows
        for i in range(50):
            predictions.append(1 if i < true_positives else 0)
            references.append(1)
        for i in range(50):
            predictions.append(1 if i < positives_predicted - true_positives else 0)
            references.append(0)
        groups += [group] * 100
    report = slice_metrics(predictions, references, groups, num_classes=2, column="g", positive=1, n_bootstrap=0)
    assert report.slices["a"]["positive_rate"] == pytest.approx(0.6)
    assert report.slices["b"]["true_positive_rate"] == pytest.approx(0.5)
    assert report.demographic_parity_difference == pytest.approx(0.6 - 0.3)
    assert report.equal_opportunity_difference == pytest.approx(0.9 - 0.5)
    assert report.slices["a"]["accuracy_ci"] == (None, None)  # n_bootstrap=0: no intervals


def test_balancing_rows_and_weights():
    rows = [{"g": "x", "i": i} for i in range(9)] + [{"g": "y", "i": i} for i in range(2)] + [{"i": 99}]
    balanced = balanced_rows(rows, "g", seed=0)
    counts = {g: sum(slice_values([r], "g")[0] == g for r in balanced) for g in ("x", "y", "missing")}
    assert counts == {"x": 9, "y": 9, "missing": 9}
    assert {id(r) for r in rows} <= {id(r) for r in balanced}  # every row kept
    weights = balance_weights(rows, "g")
    assert sum(weights) == pytest.approx(len(rows))  # mean weight 1
    totals = {g: sum(w for w, r in zip(weights, rows) if slice_values([r], "g")[0] == g) for g in ("x", "y", "missing")}
    assert totals == pytest.approx({"x": 4.0, "y": 4.0, "missing": 4.0})  # each slice the same total weight

    class Head(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=input_ids.float()[:, :3] * 0.7)

    batch = {"input_ids": torch.tensor([[1, 5, 2], [3, 0, 4]]), "labels": torch.tensor([1, 2]),
             "example_weight": torch.tensor([0.25, 3.0])}
    losses, _ = ReweightedClassificationObjective().loss(Head(), batch, {})
    z = batch["input_ids"].float() * 0.7
    direct = sum(w * -(z[i].log_softmax(-1)[y]) for i, (w, y) in enumerate(zip([0.25, 3.0], [1, 2])))
    assert float(losses["cls"]) == pytest.approx(float(direct), rel=1e-6)


# The constructed biased task: tests/_finetune_fixtures.py's biased_rows (what it is, and
# the gaps measured on it, are in its docstring).


def test_balanced_sampling_narrows_the_gap_on_a_biased_set(base, tokenizer, tmp_path):
    data = {"train": biased_rows(200, 1, 0.1), "test": biased_rows(200, 2, 0.5)}
    runs = {}
    for name, options in (("before", {"slice_by": "group"}), ("after", {"balance_by": "group"})):
        runs[name] = finetune(base, tokenizer, data, output_dir=str(tmp_path / name), epochs=4, lr=1e-2,
                              eval_every=10 ** 6, **options, **QUIET)
    before, after = (runs[n].slices["test"] for n in ("before", "after"))
    gap = {n: abs(r.slices["x"]["accuracy"] - r.slices["y"]["accuracy"]) for n, r in (("before", before), ("after", after))}
    assert gap["before"] > 0.3 and gap["after"] < 0.5 * gap["before"], (before.table(), after.table())
    assert after.slices["y"]["accuracy"] > before.slices["y"]["accuracy"] + 0.15
    assert after.equal_opportunity_difference < before.equal_opportunity_difference
    # the report's gaps are those of the model's own predictions (fastft.predict)
    predicted = fastft.predict(runs["after"].model, [r["text"] for r in data["test"]], tokenizer=tokenizer,
                               task=runs["after"].task)
    for group in ("x", "y"):
        keep = [i for i, r in enumerate(data["test"]) if r["group"] == group]
        right = sum(predicted[i] == data["test"][i]["label"] for i in keep) / len(keep)
        assert after.slices[group]["accuracy"] == pytest.approx(right)
    rates = {g: sum(predicted[i] == "b" for i, r in enumerate(data["test"]) if r["group"] == g)
             / sum(r["group"] == g for r in data["test"]) for g in ("x", "y")}
    assert after.demographic_parity_difference == pytest.approx(abs(rates["x"] - rates["y"]))
    table = slice_table({"before": before, "after": after})
    assert "accuracy (before)" in table and "accuracy (after)" in table and "| y |" in table


# ------------------------------------------------------------------ counterfactual probe


def test_swapping_terms(tmp_path):
    assert swap_terms("He said she saw his HE; shed", "he", "she") == "She said he saw his SHE; shed"
    assert swap_terms("the man and the woman", "man", "woman") == "the woman and the man"
    (tmp_path / "pairs.txt").write_text("# gender\nhe,she\n\nman\twoman  # a tab works too\n")
    (tmp_path / "pairs.json").write_text('[["he", "she"], ["his", "her"]]')
    assert read_swap_terms(str(tmp_path / "pairs.txt")) == [("he", "she"), ("man", "woman")]
    assert read_swap_terms(str(tmp_path / "pairs.json")) == [("he", "she"), ("his", "her")]
    bad = {"pairs.yaml": ("he: she\n", "unknown swap-term file format"),
           "three.txt": ("he,she,they\n", "line 1"),
           "twice.csv": ("he,she\nshe,they\n", "two pairs"),
           "empty.txt": ("# nothing\n", "no term pairs"),
           "bad.json": ('{"he": "she"}', "list of")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_swap_terms(str(tmp_path / name))
    with pytest.raises(FileNotFoundError):
        read_swap_terms(str(tmp_path / "missing.txt"))


def test_counterfactual_probe_counts_flips_and_probability_changes():
    def probabilities_of(rows):  # p(class 1) depends on "she" only
        return torch.tensor([[0.2, 0.8] if " she " in f" {r['text']} " else [0.7, 0.3] for r in rows])

    rows = [{"text": "she runs"}, {"text": "he runs"}, {"text": "it runs"}, {"text": "he and she"}]
    report = counterfactual_probe(probabilities_of, rows, [("he", "she"), ("cat", "dog")])
    entry = report.pairs["he,she"]
    # rows 0 and 1 flip (0.8 -> 0.3 for class 1; 0.7 -> 0.2 for class 0); row 3 has both terms: unchanged
    assert entry == {"rows": 3, "flips": 2, "flip_rate": pytest.approx(2 / 3), "mean_abs_change": pytest.approx(1.0 / 3)}
    assert report.pairs["cat,dog"] == {"rows": 0, "flips": 0, "flip_rate": None, "mean_abs_change": None}


# ------------------------------------------------------------------ the command line


def _snapshot(path):
    if not os.path.exists(path):
        return None
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def test_fastft_eval_audits_a_bundle(topic_run, tmp_path, capsys):
    result, _ = topic_run
    rows = topic_rows(60, 31)
    for i, row in enumerate(rows):
        if i % 6:  # every sixth row has no group: its own "missing" slice
            row["group"] = "x" if i % 2 else "y"
    rng = random.Random(3)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "news.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice("qwxkv") for _ in range(9))})
                                                 + "\n" for _ in range(30)))
    (tmp_path / "pairs.txt").write_text("fox,river\n")
    report_dir = tmp_path / "report"
    argv = ["eval", "--model", result.save_path, "--data", f"test={tmp_path / 'test.jsonl'}",
            f"news={tmp_path / 'news.jsonl'}", "--ood", "news", "--slice-by", "group", "--calibration",
            "--swap-terms", str(tmp_path / "pairs.txt"), "--report-dir", str(report_dir), "--bootstrap", "200"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| news |" in out and "msp_auroc" in out and "ece_uncalibrated" in out
    assert "| missing | 10 |" in out and "10 row(s) without 'group'" in out
    assert "| fox,river |" in out
    assert sorted(os.listdir(report_dir)) == ["reliability-test.png", "report.json", "report.md"]
    saved = json.loads((report_dir / "report.json").read_text())
    assert saved["slices"]["test"]["missing"] == 10 and saved["temperature"] == pytest.approx(result.temperature)

    # bad input: one line, exit 2, the report left as it is
    before = _snapshot(report_dir)
    (tmp_path / "pairs.yaml").write_text("fox: river\n")
    (tmp_path / "empty.jsonl").write_text("")
    data = ["--data", f"test={tmp_path / 'test.jsonl'}", f"news={tmp_path / 'news.jsonl'}"]
    bundle = ["eval", "--model", result.save_path]
    cases = [
        (bundle + data + ["--ood", "news", "--swap-terms", str(tmp_path / "pairs.yaml")], "unknown swap-term file format"),
        (bundle + data + ["--ood", "test", "news"], "AUROC needs an in-distribution set"),
        (bundle + data + ["--ood", "nothing"], "not evaluation sets"),
        (bundle + data + ["--ood", "news", "--report-dir", str(report_dir)], "already holds a report"),
        (bundle + data + ["--ood", "news", "--slice-by", "dialect"], "no row of data['test']"),
        (bundle + data + ["--calibration"], "only a set marked out-of-distribution"),
        (bundle + ["--data", f"test={tmp_path / 'test.jsonl'}", f"news={tmp_path / 'empty.jsonl'}", "--ood", "news"],
         "empty"),
        (["eval", "--model", str(tmp_path), "--data", str(tmp_path / "test.jsonl"), "--slice-by", "group"],
         "not a fine-tuning bundle"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        ours = [line for line in err.splitlines() if line.startswith("fastft ")]  # (see test_runs.py)
        assert len(ours) == 1 and err.endswith(ours[0]) and ours[0].startswith("fastft eval: "), (argv, err)
        assert message in ours[0] and "Traceback" not in err, (argv, err)
        assert _snapshot(report_dir) == before


def test_finetune_refuses_audit_options_that_cannot_apply(base, tokenizer, tmp_path):
    rows = topic_rows(16, 3)
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="no row of data\\['train'\\] has that column"):
        finetune(base, tokenizer, rows, output_dir=out, balance_by="group", **QUIET)
    with pytest.raises(ValueError, match="balance must be one of"):
        finetune(base, tokenizer, [dict(r, group="x") for r in rows], output_dir=out, balance_by="group",
                 balance="oversample", **QUIET)
    with pytest.raises(ValueError, match="needs a validation set"):
        finetune(base, tokenizer, rows, output_dir=out, calibrate=True, **QUIET)
    with pytest.raises(ValueError, match="no evaluation set has that column"):
        finetune(base, tokenizer, {"train": rows, "validation": rows}, output_dir=out, slice_by="group", **QUIET)
    assert not os.path.exists(out)
