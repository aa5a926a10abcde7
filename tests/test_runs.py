"""Runs a user can trust (issue 14): an output directory belongs to one run; a diverged run
stops and keeps nothing diverged; every bad input is one line and changes nothing; the
run's own record (run_config.json, metrics.jsonl, curves) says what happened."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers
from _tiny_models import bert_config

import fastft
from fastft import cli
from fastft.data import toy_corpus
from fastft.errors import ModelNotFound, OutputDirInUse, TrainingDiverged
from fastft.finetuning import SFTTask

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZERS = os.path.join(os.path.dirname(__file__), "data")
QUIET = dict(progress=False, plot=False)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_bert_tokenizer"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny masked-LM on disk, unlabeled text, and labelled rows (train / dev)."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(bert_config(len(tokenizer))).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    texts = toy_corpus(40, seed=1)
    (root / "corpus.txt").write_text("\n".join(texts) + "\n")
    rows = [{"text": t, "label": "fox" if "fox" in t else "other"} for t in toy_corpus(24, seed=2, max_sentences=1)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n  \n")
    return root


def snapshot(path) -> dict | None:
    """Every file under ``path`` with its bytes (None: ``path`` does not exist)."""
    if not os.path.exists(path):
        return None
    tree = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                tree[os.path.relpath(full, path)] = f.read()
    return tree


def finished_run(tmp_path, files, name="run") -> str:
    """An output directory holding a completed (tiny) fine-tuning run."""
    out = str(tmp_path / name)
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"),
                     "--eval", f"dev={files / 'dev.jsonl'}", f"output_dir={out}", "max_steps=2", "batch_size=8",
                     "progress=false"]) == 0
    return out


# ------------------------------------------------------------------- bad input, CLI


def bad_cli_cases(files, out):
    """(command line, a word the one-line error must contain)."""
    base, train, dev = str(files / "base"), str(files / "train.jsonl"), str(files / "dev.jsonl")
    finetune = ["finetune", "--model", base, "--train"]
    return [
        (finetune + [str(files / "empty.jsonl"), f"output_dir={out}"], "empty"),
        (finetune + [str(files / "corpus.txt"), f"output_dir={out}"], ".jsonl"),
        (finetune + [str(files / "missing.jsonl"), f"output_dir={out}"], "no such file"),
        (finetune + [train, "--config", str(files / "missing.yaml"), f"output_dir={out}"], "no such file"),
        (finetune + [train, "--eval", f"dev={dev}", f"output_dir={out}", "no_such_key=1"], "no_such_key"),
        (finetune + [train, "--strategy", "everything", f"output_dir={out}"], "unknown strategy"),
        (finetune + [train, "--strategy", "lora", "--strategy-options", "{rank: 8, colour: red}", f"output_dir={out}"],
         "colour"),
        (["finetune", "--model", "no-such-org/no-such-model", "--train", train, f"output_dir={out}"], "no-such-model"),
        (["pretrain", f"model.name_or_path={base}", f"data.train={files / 'empty.txt'}", f"output_dir={out}"],
         "no documents"),
        (["pretrain", f"model.name_or_path={base}", f"data.train={files / 'blank.txt'}", f"output_dir={out}"],
         "no documents"),
        (["pretrain", f"model.name_or_path={base}", f"data.train={files / 'missing.txt'}", f"output_dir={out}"],
         "no such file"),
        (["pretrain", "model.name_or_path=no-such-org/no-such-model", f"data.train={files / 'corpus.txt'}",
          f"output_dir={out}"], "no-such-model"),
        (["pretrain", "--config", str(files / "missing.yaml")], "no such file"),
        (["pretrain", f"model.name_or_path={base}", f"data.train={files / 'corpus.txt'}", "precision=fp8",
          f"output_dir={out}"], "precision"),
        (["eval", "--model", base, "--data", str(files / "missing.txt")], "no such file"),
        (["eval", "--model", base, "--data", str(files / "empty.txt")], "no documents"),
        (["eval", "--model", "no-such-org/no-such-model", "--data", str(files / "corpus.txt")], "no-such-model"),
        (["predict", "--model", str(files), "a text"], "not a fastft fine-tuning bundle"),
    ]


def test_every_bad_cli_input_is_one_line_and_changes_nothing(files, tmp_path, capsys):
    out = finished_run(tmp_path, files)  # a run whose directory every bad call must leave alone
    before = snapshot(out)
    fresh = str(tmp_path / "fresh")
    for argv, word in bad_cli_cases(files, fresh) + [(bad_cli_cases(files, out)[0][0], "empty")]:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        # (in this process, libraries imported earlier may still draw their progress bars;
        # the subprocess test below checks that the command prints nothing else)
        ours = [line for line in err.splitlines() if line.startswith("fastft ")]
        assert len(ours) == 1 and err.endswith(ours[0]), (argv, err)
        assert ours[0].startswith(f"fastft {argv[0]}: ") and word in ours[0], (argv, err)
        assert "Traceback" not in err
        assert snapshot(out) == before and snapshot(fresh) is None, argv


def test_the_installed_command_prints_no_traceback(files, tmp_path):
    """The real ``fastft`` entry point (a subprocess): one line on stderr, status 2;
    ``--debug`` lets the exception (and so its traceback) through."""
    import subprocess
    import sys

    argv = ["finetune", "--model", str(files / "base"), "--train", str(files / "empty.jsonl"),
            f"output_dir={tmp_path / 'x'}"]
    plain = subprocess.run([sys.executable, "-m", "fastft", *argv], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert plain.stderr.startswith("fastft finetune: ") and "empty" in plain.stderr
    with pytest.raises(ValueError, match="empty"):
        cli.main(["--debug", *argv])


def test_key_value_overrides_are_never_taken_as_evaluation_sets(files, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"),
                     "--eval", f"dev={files / 'dev.jsonl'}", "max_steps=2", "batch_size=8", f"output_dir={out}",
                     "progress=false"]) == 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["max_steps"] == 2 and set(record["data_files"]) == {"train", "dev"}


# ------------------------------------------------------------------- bad input, Python


def test_python_entry_points_raise_the_documented_errors(files, tokenizer, tmp_path):
    out = str(tmp_path / "out")
    rows = [{"text": t, "label": label} for t, label in zip(toy_corpus(4, seed=3), [0, 1, "0", "1"])]
    with pytest.raises(ValueError, match=r"mix label forms: 0, 1 and '0', '1'"):
        fastft.finetune(str(files / "base"), tokenizer, rows, output_dir=out, **QUIET)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        fastft.finetune("no-such-org/no-such-model", tokenizer, rows[:2], output_dir=out, **QUIET)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        fastft.pretrain("no-such-org/no-such-model", tokenizer, str(files / "corpus.txt"), output_dir=out, **QUIET)
    with pytest.raises(FileNotFoundError, match="no such file"):
        fastft.pretrain(str(files / "base"), tokenizer, str(files / "missing.txt"), output_dir=out, **QUIET)
    with pytest.raises(ValueError, match="no documents"):
        fastft.pretrain(str(files / "base"), tokenizer, str(files / "empty.txt"), output_dir=out, **QUIET)
    with pytest.raises(KeyError, match="learning_rate"):
        fastft.pretrain(str(files / "base"), tokenizer, str(files / "corpus.txt"), output_dir=out, learning_rate=1)
    assert snapshot(out) is None


def test_the_cli_takes_short_keys_as_python_does(files, tmp_path):
    """``lr=`` works on the command line as in ``fastft.finetune(lr=...)``."""
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"), "lr=3e-4",
                     "max_steps=1", f"output_dir={out}", "progress=false"]) == 0
    assert json.loads((out / "run_config.json").read_text())["optim"]["lr"] == 3e-4


# ------------------------------------------------------------------- one directory, one run


def test_a_second_run_into_a_directory_refuses_and_overwrite_moves_the_first_aside(files, tmp_path, capsys):
    out = finished_run(tmp_path, files)
    first = snapshot(out)
    argv = ["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"), f"output_dir={out}",
            "max_steps=1", "progress=false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "resume=auto" in err and "overwrite=true" in err
    assert snapshot(out) == first
    with pytest.raises(OutputDirInUse):  # the Python entry point too, before any work
        fastft.finetune("no-such-model-is-loaded-before-the-check", None, [{"text": "a", "label": 0}], output_dir=out)

    assert cli.main(argv + ["overwrite=true"]) == 0
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run.previous-")]
    assert len(moved) == 1 and snapshot(tmp_path / moved[0]) == first  # intact, byte for byte
    second = json.loads(open(os.path.join(out, "run_config.json")).read())
    assert second["max_steps"] == 1 and len(open(os.path.join(out, "metrics.jsonl")).read().splitlines()) >= 1


def tiny_mlm(tokenizer, seed=0, **sizes):
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(bert_config(len(tokenizer), **sizes))


def test_resuming_another_models_checkpoint_fails_with_what_differs(files, tokenizer, tmp_path):
    texts = toy_corpus(30, seed=4)
    out = str(tmp_path / "run")
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, texts, output_dir=out, max_steps=2, block_size=32, **QUIET)
    with pytest.raises(ValueError, match=r"is of another run .*names_and_shapes") as error:
        fastft.pretrain(tiny_mlm(tokenizer, hidden_size=16, intermediate_size=32), tokenizer, texts, output_dir=out,
                        max_steps=4, block_size=32, resume="auto", **QUIET)
    assert len(str(error.value).splitlines()) == 1


def test_pruning_touches_only_this_runs_checkpoints(tokenizer, tmp_path):
    """A checkpoint of another run in the directory (copied in by hand) survives keep_last."""
    import shutil

    texts = toy_corpus(30, seed=4)
    out = tmp_path / "run"
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, texts, output_dir=str(out), max_steps=1, block_size=32, **QUIET)
    foreign = out / "checkpoints" / "step-000000"
    shutil.copytree(out / "checkpoints" / "step-000001", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "step": 0, "run_id": "someone-else"}))
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, texts, output_dir=str(out), max_steps=4, save_every=1,
                    keep_last=1, block_size=32, resume="auto", **QUIET)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000000", "step-000004"]


def test_resume_says_where_and_logs_no_step_twice(tokenizer, tmp_path, capsys):
    """A run interrupted after logging steps past its last checkpoint: the resumed run
    drops those lines and logs each step once."""
    texts = toy_corpus(40, seed=5)
    out = tmp_path / "run"
    options = dict(output_dir=str(out), block_size=32, batch_size=4, log_every=1, save_every=3, keep_last=5, **QUIET)
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, texts, max_steps=5, **options)  # checkpoints 3 and 5
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000005")  # as if it had died after logging step 5
    capsys.readouterr()
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, texts, max_steps=6, resume="auto", **options)
    assert "resumed from step 3" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------- a diverged run


def strict_json_lines(path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in open(path).read().splitlines()]


def test_a_diverged_pretraining_run_stops_and_keeps_its_last_good_checkpoint(tokenizer, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 2: the loss is nan .* lower learning rate") as error:
        fastft.pretrain(tiny_mlm(tokenizer), tokenizer, toy_corpus(60, seed=0), output_dir=str(out), max_steps=10,
                        lr=1e6, save_every=1, log_every=1, batch_size=4, block_size=32, **QUIET)
    assert "step-000001" in str(error.value)
    assert os.listdir(out / "checkpoints") == ["step-000001"]  # nothing written at or after the NaN
    records = strict_json_lines(out / "metrics.jsonl")
    assert records[-1]["diverged"] and records[-1]["loss"] is None
    model = transformers.BertForMaskedLM.from_pretrained(out / "checkpoints" / "step-000001")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "final").exists()


def test_a_diverged_finetuning_run_exits_non_zero_and_saves_no_bundle(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"), "--eval",
                     f"dev={files / 'dev.jsonl'}", "optim.lr=1e6", "max_steps=6", "batch_size=4",
                     f"output_dir={out}", "progress=false"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastft ")]
    assert len(ours) == 1 and "diverged" in ours[0] and "learning rate" in ours[0]
    assert not (out / "finetuned").exists()
    strict_json_lines(out / "metrics.jsonl")


def test_best_model_selection_never_picks_a_nan():
    from fastft.train.callbacks import BestModel, EarlyStopping

    class State:
        step, should_stop = 0, False
        model = torch.nn.Linear(2, 2)

    state, best, stopping = State(), BestModel("loss", "min"), EarlyStopping(1, "loss")
    for step, value in enumerate([float("nan"), 2.0, float("nan"), float("inf")], start=1):
        state.step = step
        best.on_evaluate(state, {"loss": value})
        stopping.on_evaluate(state, {"loss": value})
    assert (best.best, best.best_step) == (2.0, 2)
    assert state.should_stop  # a NaN after the best counts as no improvement


# ------------------------------------------------------------------- the run's own record


def test_run_config_says_how_to_rerun_a_finetuning_run(files, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"),
                     "--strategy", "lora", "--strategy-options", "{rank: 4}", "--eval", f"dev={files / 'dev.jsonl'}",
                     "max_steps=2", "seed=7", f"output_dir={out}", "progress=false"]) == 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["task"]["name"] == "classification" and record["task"]["labels"] == ["fox", "other"]
    assert record["strategy"] == {**record["strategy"], "name": "lora", "rank": 4}
    assert record["model"]["name_or_path"] == str(files / "base")
    assert record["data_files"] == {"train": str(files / "train.jsonl"), "dev": str(files / "dev.jsonl")}
    assert record["seed"] == 7 and record["versions"]["fastft"] == fastft.__version__ and "torch" in record["versions"]
    assert "objective" not in record  # a fine-tuning run has no pretraining objective
    # ... and it is a config file: the same run again, into another directory
    rerun = tmp_path / "rerun"
    assert cli.main(["finetune", "--model", str(files / "base"), "--train", str(files / "train.jsonl"), "--config",
                     str(out / "run_config.json"), f"output_dir={rerun}"]) == 0
    assert json.loads((rerun / "run_config.json").read_text())["strategy"] == record["strategy"]


def test_logged_training_loss_is_the_mean_over_the_interval(tokenizer, tmp_path):
    out = tmp_path / "run"
    options = dict(block_size=32, batch_size=4, **QUIET)
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, toy_corpus(40, seed=6), output_dir=str(out / "every"),
                    max_steps=6, log_every=1, **options)
    fastft.pretrain(tiny_mlm(tokenizer), tokenizer, toy_corpus(40, seed=6), output_dir=str(out / "three"),
                    max_steps=6, log_every=3, **options)
    every = [r for r in strict_json_lines(out / "every" / "metrics.jsonl") if "loss" in r]
    three = [r for r in strict_json_lines(out / "three" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in three] == [3, 6]
    for record, window in zip(three, (every[:3], every[3:])):
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in window) / 3, rel=1e-6)
        assert record["steps_logged"] == 3


def test_finetuning_curves_plot_the_task_metric_per_set(files, tmp_path):
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (files / "dev.jsonl").read_text().splitlines()]
    result = fastft.finetune(str(files / "base"), str(files / "base"), {"train": rows, "dev": dev, "ood": dev[:4]},
                             output_dir=str(out), epochs=2, batch_size=8, progress=False, save=False)
    assert (out / "curves.png").stat().st_size > 0
    assert {h["set"] for h in result.history} == {"dev", "ood"} and all("accuracy" in h for h in result.history)


# ------------------------------------------------------------------- smaller promises


def test_predict_reads_a_file_and_prints_probabilities(files, tmp_path, capsys):
    out = finished_run(tmp_path, files)
    (tmp_path / "inputs.txt").write_text("the quick fox\n\nthe lazy dog\n")
    capsys.readouterr()
    assert cli.main(["predict", "--model", os.path.join(out, "finetuned"), "--file", str(tmp_path / "inputs.txt"),
                     "one more"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in lines] == ["one more", "the quick fox", "the lazy dog"]
    for record in lines:
        assert record["label"] in ("fox", "other") and set(record["probabilities"]) == {"fox", "other"}
        assert math.isclose(sum(record["probabilities"].values()), 1.0, rel_tol=1e-5)
        assert record["probabilities"][record["label"]] == max(record["probabilities"].values())


def test_eval_of_a_bundle_prints_a_table_or_json(files, tmp_path, capsys):
    out = finished_run(tmp_path, files)
    capsys.readouterr()
    assert cli.main(["eval", "--model", os.path.join(out, "finetuned"), "--data", f"dev={files / 'dev.jsonl'}"]) == 0
    table = capsys.readouterr().out
    assert "| set |" in table and "| dev |" in table and "accuracy" in table
    assert cli.main(["eval", "--model", os.path.join(out, "finetuned"), "--data", f"dev={files / 'dev.jsonl'}",
                     "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)["sets"]["dev"]


def test_a_model_without_its_masked_lm_head_is_flagged(files, tokenizer, tmp_path, capsys):
    """A sentence-encoder checkpoint (no MLM head): eval warns, forgetting refuses."""
    torch.manual_seed(0)
    transformers.BertModel(bert_config(len(tokenizer))).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "encoder"), "--data", str(files / "corpus.txt"), "--json",
                     "--block-size", "32"]) == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "no pretrained mlm head" in captured.err
    assert "random head" in json.loads(captured.out)["warning"]
    rows = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="no pretrained masked-LM head"):
        fastft.finetune(str(tmp_path / "encoder"), tokenizer, rows, pretraining_data=toy_corpus(20, seed=1),
                        output_dir=str(tmp_path / "run"), max_steps=1, **QUIET)


def test_sft_without_an_end_of_sequence_token_warns(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_gpt_tokenizer"))
    rows = [{"prompt": "the fox", "response": "jumps"}]
    features = SFTTask().preprocess(rows, tokenizer, training=True)
    assert features[0]["input_ids"][-1] == tokenizer.eos_token_id  # appended when there is one
    tokenizer.eos_token = None
    with pytest.warns(UserWarning, match="no end-of-sequence token"):
        SFTTask().preprocess(rows, tokenizer, training=True)


def test_a_lora_bundle_reloads_to_the_same_predictions_without_a_random_pooler(files, tmp_path, capsys):
    """The base is a masked-LM checkpoint: the classifier's pooler is initialised at random
    when it is loaded and stays frozen under LoRA; the bundle must carry it."""
    rows = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()]
    result = fastft.finetune(str(files / "base"), str(files / "base"), rows, strategy="lora",
                             output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, **QUIET)
    texts = [r["text"] for r in rows]
    expected = fastft.predict(result.model, texts, tokenizer=result.tokenizer, task=result.task, scores=True)
    capsys.readouterr()
    reloaded = fastft.predict(result.save_path, texts, scores=True)
    assert "newly initialized" not in capsys.readouterr().err
    for a, b in zip(expected, reloaded):
        assert a["label"] == b["label"]
        for label in a["probabilities"]:
            assert b["probabilities"][label] == pytest.approx(a["probabilities"][label], abs=1e-6)


def test_fastft_bench_writes_outside_the_source_tree(monkeypatch, tmp_path):
    from fastft import bench

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bench.default_out_dir() == str(tmp_path / ".cache" / "fastft" / "bench")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bench.default_out_dir() == str(tmp_path / "cache" / "fastft" / "bench")



def test_a_resumed_run_still_ends_on_the_best_weights_from_before_its_checkpoint(tmp_path):
    """BestModel's weights travel in the checkpoint (a resumed run used to end on its last
    weights while reporting the best metric of before the interruption)."""
    from fastft.train.callbacks import BestModel
    from fastft.train.checkpoint import load_checkpoint, save_checkpoint

    class State:
        step, model = 1, torch.nn.Linear(3, 2)

    first = BestModel("loss", "min", track_initial=True)
    first.on_train_begin(State)
    first.on_evaluate(State, {"loss": 1.0})
    best_weights = {n: p.detach().clone() for n, p in State.model.named_parameters()}
    with torch.no_grad():  # training goes on past the best evaluation, then a checkpoint
        for p in State.model.parameters():
            p.add_(1.0)
    path = save_checkpoint(str(tmp_path / "checkpoints"), 2, model=State.model,
                           extra_state={"callbacks": [first.state_dict()]})

    resumed = BestModel("loss", "min", track_initial=True)
    _, extra = load_checkpoint(path, model=State.model)
    resumed.load_state_dict(extra["callbacks"][0])
    State.step = 3
    resumed.on_evaluate(State, {"loss": 2.0})  # worse than the best before the checkpoint
    resumed.on_train_end(State)
    assert (resumed.best, resumed.best_step) == (1.0, 1)
    for name, param in State.model.named_parameters():
        assert torch.equal(param, best_weights[name]), name


def test_a_checkpoint_without_the_best_weights_says_so_on_resume():
    from fastft.train.callbacks import BestModel

    with pytest.warns(UserWarning, match="not its weights"):
        BestModel("loss", "min").load_state_dict({"best": 1.0, "best_step": 4})
