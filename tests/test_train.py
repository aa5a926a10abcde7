"""fastft.train: accumulation, exact resume (also after SIGKILL), atomic checkpoints, loss
going down, the four model families, schedules, config/CLI, Hugging Face export."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import datasets
import pytest
import torch
import yaml

import fastft
from fastft import cli
from fastft.data import MaskedLMCollator, prepare_lm_data, toy_corpus, toy_tokenizer
from fastft.recipes.pretrain import PretrainConfig
from fastft.train import (
    SCHEDULES,
    Callback,
    TrainConfig,
    accumulate_gradients,
    build_scheduler,
    evaluate,
    get_objective,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    register_schedule,
    save_checkpoint,
    train,
)
from fastft.train import checkpoint as checkpoint_module
from fastft.train.config import apply_overrides, resolve_kwarg_overrides
from fastft.train.runtime import maybe_patch

from _tiny_models import bert_config, gpt2_config, llama_config, roberta_config  # tests/_tiny_models.py

datasets.disable_progress_bars()
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus():
    return toy_corpus(160, seed=0)


@pytest.fixture(scope="module")
def bert_tokenizer(corpus):
    return toy_tokenizer(corpus)


@pytest.fixture(scope="module")
def gpt_tokenizer(corpus):
    return toy_tokenizer(corpus, kind="gpt")


def tiny_bert(tokenizer, cls=None, dropout=0.1, **overrides):
    config = bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, dropout=dropout, pad_token_id=tokenizer.pad_token_id, **overrides)
    return (cls or transformers.BertForMaskedLM)(config)


def tiny_gpt2(tokenizer, dropout=0.1):
    config = gpt2_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, dropout=dropout, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return transformers.GPT2LMHeadModel(config)


def tiny_roberta(tokenizer):
    config = roberta_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=66,  # RoBERTa positions start after the padding index
                            dropout=0.1, pad_token_id=tokenizer.pad_token_id)
    return transformers.RobertaForMaskedLM(config)


def tiny_llama(tokenizer):
    config = llama_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


QUIET = dict(progress=False, plot=False, export=False, fused=False)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- gradient accumulation


def _trim(batch):
    """A row slice of a padded batch, re-padded to its own longest row."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length].contiguous() if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(corpus, bert_tokenizer, gpt_tokenizer, objective):
    tokenizer = bert_tokenizer if objective == "mlm" else gpt_tokenizer
    data, collator = prepare_lm_data(corpus[:40], tokenizer, objective, block_size=48, packing=False, seed=5)
    model = (tiny_bert(tokenizer, dropout=0.0) if objective == "mlm" else tiny_gpt2(tokenizer, dropout=0.0)).double()
    obj = get_objective(objective)
    full = collator([data[i] for i in range(8)])  # 8 documents of different lengths
    micro = [_trim({k: v[i : i + 2] if torch.is_tensor(v) else v for k, v in full.items()}) for i in range(0, 8, 2)]
    counts = [obj.counts(b)[objective] for b in micro]
    assert len(set(counts)) > 1  # uneven supervised tokens: a mean of means would be wrong

    model.zero_grad()
    big = accumulate_gradients(model, obj, [full])
    big_grad = _grads(model)
    model.zero_grad()
    acc = accumulate_gradients(model, obj, micro)
    acc_grad = _grads(model)
    # fp64 model; GPT-2's loss function upcasts logits to fp32 only, so CLM is exact to fp32.
    rtol = 1e-10 if objective == "mlm" else 1e-5
    assert acc["loss"] == pytest.approx(big["loss"], rel=rtol)
    torch.testing.assert_close(acc_grad, big_grad, rtol=rtol, atol=rtol * 1e-3 * float(big_grad.abs().max()))

    # The naive alternative (average of per-micro-batch means) differs: the test can fail.
    model.zero_grad()
    for b in micro:
        (model(**b).loss / len(micro)).backward()
    assert (_grads(model) - big_grad).abs().max() > 1e-2 * big_grad.abs().max()


def test_extra_losses_are_added_once_per_step(corpus, bert_tokenizer):
    data, collator = prepare_lm_data(corpus[:10], bert_tokenizer, "mlm", block_size=32, packing=False)
    model = tiny_bert(bert_tokenizer, dropout=0.0).double()
    obj = get_objective("mlm")
    batches = [collator([data[i]]) for i in range(3)]
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    def l2sp(m):  # L2-SP pulls weights towards the starting point
        return 0.5 * sum(((p - reference[n]) ** 2).sum() for n, p in m.named_parameters())

    def l2(m):
        return 1e-3 * sum((p**2).sum() for p in m.parameters())

    model.zero_grad()
    accumulate_gradients(model, obj, batches)
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = accumulate_gradients(model, obj, batches, extra_losses=[l2sp, l2])
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n] + 2e-3 * p.detach(), rtol=1e-10, atol=1e-12)
    assert out["extra_loss"] == pytest.approx(float(l2(model).detach()), rel=1e-10)


# ------------------------------------------------------------------------- exact resume


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, metrics):
        if state.step >= self.step:
            state.should_stop = True


RESUME_OVERRIDES = dict(max_steps=7, batch_size=4, grad_accum_steps=2, save_every=2, keep_last=2, lr=2e-3, seed=3, **QUIET)

# The same run from files, in this process or in a child (the SIGKILL test): model and
# data come from disk so both processes start from identical bytes.
CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from test_train import run_from_disk
from fastft.train import Callback

class Slow(Callback):  # leave the parent time to kill us mid-run
    def on_step_end(self, state, metrics):
        time.sleep(0.3)

run_from_disk(sys.argv[1], json.loads(sys.argv[2]), [Slow()])
"""


def run_from_disk(work, overrides, callbacks=()):
    model = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(work, "init"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(work, "init"))
    data = datasets.load_from_disk(os.path.join(work, "data"))
    collator = MaskedLMCollator(tokenizer, seed=overrides.get("seed", 0))
    config = apply_overrides(TrainConfig(), resolve_kwarg_overrides(TrainConfig(), overrides))
    return train(model, "mlm", data, collator=collator, config=config, tokenizer=tokenizer, callbacks=callbacks)


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, corpus, bert_tokenizer):
    work = str(tmp_path_factory.mktemp("resume"))
    torch.manual_seed(0)
    tiny_bert(bert_tokenizer).save_pretrained(os.path.join(work, "init"))  # dropout on: RNG matters
    bert_tokenizer.save_pretrained(os.path.join(work, "init"))
    data, _ = prepare_lm_data(corpus[:60], bert_tokenizer, "mlm", block_size=32)
    data.save_to_disk(os.path.join(work, "data"))
    assert 2 < len(data) / 4 / 2 < 7  # several optimizer steps per epoch, and several epochs in 7 steps
    reference = run_from_disk(work, {**RESUME_OVERRIDES, "output_dir": os.path.join(work, "reference")})
    return work, reference


def _assert_same_run(resumed, reference):
    assert resumed.step == reference.step == RESUME_OVERRIDES["max_steps"]
    for (name, a), b in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), name  # bitwise
    a_state, b_state = resumed.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    for key in b_state:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a_state[key][field], b_state[key][field])
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.tokens_seen) == (
        reference.epoch,
        reference.batch_in_epoch,
        reference.tokens_seen,
    )


def test_resume_is_bitwise_exact(resume_setup):
    work, reference = resume_setup
    out = os.path.join(work, "interrupted")
    first = run_from_disk(work, {**RESUME_OVERRIDES, "output_dir": out}, [StopAt(3)])
    assert first.step == 3 and latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step-000003")
    # Stopping early really stopped early: the weights differ from the full run's.
    assert not all(torch.equal(a, b) for a, b in zip(first.model.parameters(), reference.model.parameters()))
    resumed = run_from_disk(work, {**RESUME_OVERRIDES, "output_dir": out, "resume": "auto"})
    _assert_same_run(resumed, reference)


def test_resume_after_sigkill_is_bitwise_exact(resume_setup):
    work, reference = resume_setup
    out = os.path.join(work, "killed")
    overrides = {**RESUME_OVERRIDES, "output_dir": out, "save_every": 1}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, work, json.dumps(overrides), os.path.dirname(__file__)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoints = os.path.join(out, "checkpoints")
    deadline = time.monotonic() + 300  # generous: the machine may be shared
    try:
        while latest_checkpoint(checkpoints) is None:
            if child.poll() is not None:
                pytest.fail(f"child ended before a checkpoint: {child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 300 s")
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = int(os.path.basename(latest_checkpoint(checkpoints)).split("-")[1])
    assert killed_at < RESUME_OVERRIDES["max_steps"]
    resumed = run_from_disk(work, {**overrides, "resume": "auto"})
    _assert_same_run(resumed, reference)


# ------------------------------------------------------------------------ checkpoints


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, bert_tokenizer, monkeypatch):
    root = str(tmp_path / "checkpoints")
    model = tiny_bert(bert_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[2, 10, 11, 3]]), labels=torch.tensor([[-100, 10, 11, -100]])).loss.backward()
    optimizer.step()
    saved = _params(model)
    save_checkpoint(root, 1, model=model, optimizer=optimizer, trainer_state={"epoch": 0})

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):  # the process dies after the weights, before the rest
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(root, 2, model=model, optimizer=optimizer, trainer_state={"epoch": 0})
    monkeypatch.undo()
    leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert leftovers and os.path.isfile(os.path.join(root, leftovers[0], "model.safetensors"))

    assert latest_checkpoint(root).endswith("step-000001")
    fresh = tiny_bert(bert_tokenizer)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state, _ = load_checkpoint(latest_checkpoint(root), model=fresh, optimizer=fresh_optimizer)
    assert state["step"] == 1
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1

    for step in (3, 4, 5):  # keep_last, and the crashed save's leftovers are swept
        save_checkpoint(root, step, model=model, keep_last=2)
    assert sorted(os.listdir(root)) == ["step-000004", "step-000005"]


# ---------------------------------------------------------------------- loss goes down


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_loss_goes_down_on_a_tiny_corpus(tmp_path, corpus, bert_tokenizer, gpt_tokenizer, objective):
    tokenizer = bert_tokenizer if objective == "mlm" else gpt_tokenizer
    torch.manual_seed(0)
    model = tiny_bert(tokenizer) if objective == "mlm" else tiny_gpt2(tokenizer)
    held_out = corpus[140:]
    before = evaluate(model, held_out, objective, tokenizer=tokenizer, block_size=32)
    state = fastft.pretrain(
        model,
        tokenizer,
        {"train": corpus[:140], "validation": held_out},
        objective,
        output_dir=str(tmp_path),
        max_steps=40,
        batch_size=8,
        lr=3e-3,
        block_size=32,
        eval_every=20,
        log_every=5,
        schedule__warmup_steps=4,
        **QUIET,
    )
    after = state.last_eval
    assert after["step"] == 40
    assert after["loss"] < before["loss"] - 0.7, (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == 8 and train_losses[-1] < train_losses[0]
    assert [r["step"] for r in records if "eval_loss" in r] == [20, 40]


# ------------------------------------------------------- the model families, precisions


@pytest.mark.parametrize(
    "family, objective",
    [("roberta", "mlm"), ("llama", "clm"), ("bert-pretraining", "mlm+nsp")],
)
def test_each_model_family_trains(tmp_path, corpus, bert_tokenizer, gpt_tokenizer, family, objective):
    if family == "roberta":
        tokenizer, model = bert_tokenizer, tiny_roberta(bert_tokenizer)
    elif family == "llama":
        tokenizer, model = gpt_tokenizer, tiny_llama(gpt_tokenizer)
    else:
        tokenizer, model = bert_tokenizer, tiny_bert(bert_tokenizer, cls=transformers.BertForPreTraining)
    before = _params(model)
    data = toy_corpus(40, min_sentences=2, max_sentences=5, seed=9)
    state = fastft.pretrain(
        model, tokenizer, {"train": data[:32], "validation": data[32:]}, objective,
        output_dir=str(tmp_path), max_steps=3, batch_size=4, block_size=32, **QUIET,
    )
    assert state.step == 3 and math.isfinite(state.last_eval["loss"])
    if objective == "mlm+nsp":
        assert {"mlm_loss", "nsp_loss", "num_nsp"} <= set(state.last_eval)
        assert state.last_eval["loss"] == pytest.approx(state.last_eval["mlm_loss"] + state.last_eval["nsp_loss"])
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())


def test_mlm_nsp_needs_a_pair_head(tmp_path, corpus, bert_tokenizer):
    with pytest.raises(ValueError, match="next-sentence head"):
        fastft.pretrain(tiny_bert(bert_tokenizer), bert_tokenizer, corpus[:10], "mlm+nsp", output_dir=str(tmp_path), **QUIET)


@pytest.mark.parametrize("precision", ["bf16", "auto"])  # fp16 on a CPU is refused: tests/test_precision.py
def test_mixed_precision_and_checkpointing_run(tmp_path, corpus, bert_tokenizer, precision):
    model = tiny_bert(bert_tokenizer)
    state = fastft.pretrain(
        model, bert_tokenizer, corpus[:24], "mlm", output_dir=str(tmp_path), max_steps=2, batch_size=4,
        block_size=32, precision=precision, gradient_checkpointing=True, **QUIET,
    )
    assert state.step == 2 and math.isfinite(state.last_train["loss"])
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_early_stopping_stops(tmp_path, corpus, bert_tokenizer):
    state = fastft.pretrain(
        tiny_bert(bert_tokenizer), bert_tokenizer, {"train": corpus[:40], "validation": corpus[40:48]}, "mlm",
        output_dir=str(tmp_path), max_steps=20, batch_size=4, block_size=32, lr=0.0, eval_every=1,
        early_stopping_patience=2, **QUIET,
    )
    # lr 0: the held-out loss never improves after the first evaluation -> stop at the third
    assert state.step == 3 and state.should_stop


def test_unavailable_patch_warns_and_continues(monkeypatch, bert_tokenizer):
    monkeypatch.setitem(sys.modules, "fastft.models", None)  # import fails
    model = tiny_bert(bert_tokenizer)
    with pytest.warns(UserWarning, match="unpatched"):
        assert maybe_patch(model, True) is model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert maybe_patch(model, False) is model


# ------------------------------------------------------------------------- schedules


def test_schedules_and_registry():
    def lrs(name, total=10, warmup=2, **kw):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=2.0)
        scheduler = build_scheduler(optimizer, name, total_steps=total, warmup_steps=warmup, **kw)
        values = []
        for _ in range(total):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs("linear") == pytest.approx([1.0, 2.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25])
    cos = lrs("cosine", min_lr_ratio=0.1)
    assert cos[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert cos[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lrs("constant", warmup=0) == [2.0] * 10

    @register_schedule("test_halving")
    def halving(step, *, total_steps, warmup_steps=0, min_lr_ratio=0.0, every=1):
        return 0.5 ** (step // every)

    try:
        assert lrs("test_halving", total=4, warmup=0, every=2) == [2.0, 2.0, 1.0, 1.0]
    finally:
        SCHEDULES.pop("test_halving")
    with pytest.raises(KeyError, match="registered"):
        lrs("nope")


# --------------------------------------------------------------------------- config


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 5, "optim": {"lr": 1, "betas": [0.8, 0.9]}, "data": {"block_size": 64}}))
    config = load_config(str(path), ["optim.lr=3e-4", "data.packing=false", "resume=null", "schedule.options={every: 3}"],
                         cls=PretrainConfig)
    assert config.max_steps == 5 and config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.9) and config.data.block_size == 64 and config.data.packing is False
    assert config.schedule.options == {"every": 3} and config.resume is None
    assert load_config(str(path), cls=PretrainConfig).optim.lr == 1.0  # int in YAML, float field
    with pytest.raises(KeyError, match=r"unknown config key\(s\) \['data'\]"):
        load_config(str(path))  # the engine's TrainConfig has no data section: that is pretraining's

    with pytest.raises(KeyError, match=r"valid keys under optim: \['lr'"):
        load_config(str(path), ["optim.learning_rate=1"], cls=PretrainConfig)
    path.write_text("batchsize: 3\n")
    with pytest.raises(KeyError, match=r"'batchsize'.*valid keys.*'batch_size'"):
        load_config(str(path))
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ValueError, match="precision"):
        load_config(None, ["precision=fp8"])

    assert resolve_kwarg_overrides(PretrainConfig(), {"lr": 1, "optim__eps": 2, "max_steps": 3, "block_size": 4}) == {
        "optim.lr": 1, "optim.eps": 2, "max_steps": 3, "data.block_size": 4,
    }
    assert resolve_kwarg_overrides(TrainConfig(), {"lr": 1, "optim__eps": 2, "max_steps": 3}) == {
        "optim.lr": 1, "optim.eps": 2, "max_steps": 3,
    }
    with pytest.raises(KeyError, match="unknown"):
        resolve_kwarg_overrides(TrainConfig(), {"block_size": 4})  # the loop's config knows no data section
    with pytest.raises(KeyError, match="unknown"):
        resolve_kwarg_overrides(TrainConfig(), {"learning_rate": 1})


def test_cli_pretrain_eval_and_hf_export(tmp_path, corpus, bert_tokenizer, capsys):
    base = tmp_path / "base"  # a "Hub" model directory: config + tokenizer, no weights
    tiny_bert(bert_tokenizer).config.save_pretrained(base)
    bert_tokenizer.save_pretrained(base)
    (tmp_path / "train.txt").write_text("\n".join(corpus[:120]) + "\n")
    (tmp_path / "held_out.txt").write_text("\n".join(corpus[120:]) + "\n")
    run = {
        "output_dir": str(tmp_path / "run"),
        "objective": "mlm",
        "max_steps": 4,
        "batch_size": 4,
        "progress": False,
        "fused": False,
        "model": {"name_or_path": str(base), "from_scratch": True, "config_overrides": {"num_hidden_layers": 1}},
        "data": {"train": str(tmp_path / "train.txt"), "validation_fraction": 0.1, "block_size": 48},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))

    assert cli.main(["pretrain", "--config", str(tmp_path / "run.yaml"), "max_steps=3", "optim.lr=1e-3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 3 and math.isfinite(summary["eval"]["loss"])
    final = tmp_path / "run" / "final"
    assert summary["export"] == str(final)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000

    # The export loads with plain transformers and equals the checkpoint.
    exported = transformers.AutoModelForMaskedLM.from_pretrained(final)
    assert exported.config.num_hidden_layers == 1
    checkpointed = transformers.AutoModelForMaskedLM.from_pretrained(summary["checkpoint"])
    ids = transformers.AutoTokenizer.from_pretrained(final)(corpus[0], return_tensors="pt")["input_ids"]
    assert ids.tolist() == bert_tokenizer(corpus[0], return_tensors="pt")["input_ids"].tolist()
    exported.eval(), checkpointed.eval()
    assert torch.equal(exported(ids).logits, checkpointed(ids).logits)

    assert cli.main(["eval", "--model", str(final), "--data", str(tmp_path / "held_out.txt"), "--block-size", "48",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = evaluate(exported, str(tmp_path / "held_out.txt"), "mlm", tokenizer=bert_tokenizer, block_size=48)
    assert result["objective"] == "mlm" and result["loss"] == pytest.approx(expected["loss"])
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))

    assert cli.main(["pretrain", "--config", str(tmp_path / "run.yaml"), "optim.rate=1"]) == 2
    assert capsys.readouterr().err.startswith("fastft pretrain: unknown config key 'optim.rate'; valid keys under optim")
    # the recipe's own main raises (fastft.cli reports it); --debug lets it through
    from fastft.recipes.pretrain import main as pretrain_main

    with pytest.raises(KeyError, match="valid keys under optim"):
        pretrain_main(["--config", str(tmp_path / "run.yaml"), "optim.rate=1"])
    with pytest.raises(KeyError, match="valid keys under optim"):
        cli.main(["--debug", "pretrain", "--config", str(tmp_path / "run.yaml"), "optim.rate=1"])
    for command in ("finetune", "predict"):  # their required arguments are named
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command])
        assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err


def test_cli_finetune_and_predict_name_missing_files(tmp_path, capsys):
    assert cli.main(["predict", "--model", str(tmp_path / "not-a-bundle"), "some text"]) == 2
    assert "not a fastft fine-tuning bundle" in capsys.readouterr().err
    assert cli.main(["finetune", "--model", str(tmp_path), "--train", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_eval_scores_a_finetuned_bundle_on_labelled_sets(tmp_path, capsys):
    """`fastft eval` on a bundle gives the same task metrics as the run that saved it."""
    from fastft.recipes.finetune import finetune

    tokenizer = toy_tokenizer()
    rows = [{"text": s, "label": "fox" if "fox" in s else "other"} for s in toy_corpus(40, seed=3, max_sentences=1)]
    config = bert_config(len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=512, dropout=0.1, num_labels=2)
    torch.manual_seed(0)
    result = finetune(transformers.BertForSequenceClassification(config), tokenizer, {"train": rows[:28], "dev": rows[28:]},
                      output_dir=str(tmp_path / "run"), epochs=1, batch_size=8, fused=False, progress=False, plot=False)
    with open(tmp_path / "dev.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[28:])
    capsys.readouterr()
    assert cli.main(["eval", "--model", result.save_path, "--data", f"held-out={tmp_path / 'dev.jsonl'}", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "classification"
    for metric in ("accuracy", "macro_f1", "loss"):
        assert printed["sets"]["held-out"][metric] == pytest.approx(result.metrics["dev"][metric], rel=1e-5), metric
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"text": "a fox .", "label": "huge"}) + "\n")
    assert cli.main(["eval", "--model", result.save_path, "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "outside the configured classes" in capsys.readouterr().err
