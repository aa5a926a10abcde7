"""fastft.train under DDP and FSDP2: two processes on the gloo backend (CPU).

One process with global batch B is the reference; DDP and FSDP2 with two ranks of B/2
must give the same losses and weights (fp32 tolerance), see disjoint shards of the data,
resume across world sizes (2 -> 1 from an FSDP checkpoint, 1 -> 2 under DDP), and stop
with a clear error, not a hang, when a rank dies.

Ranks are forked from the test process (no re-import of torch / transformers per rank);
each writes what it saw into files that the test reads back.
"""

import json
import multiprocessing
import os
import socket
import time
import traceback

import datasets
import pytest
import torch

from fastft.data import CausalLMCollator, prepare_lm_data, toy_corpus, toy_tokenizer
from fastft.data.sampler import EpochBatches
from fastft.train import Callback, TrainConfig, latest_checkpoint, load_checkpoint, train
from fastft.train.checkpoint import is_sharded_checkpoint
from fastft.train.distributed import trainable_state_dict
from fastft.train.config import apply_overrides, resolve_kwarg_overrides

from _tiny_models import bert_config, gpt2_config  # tests/_tiny_models.py

pytestmark = pytest.mark.distributed
datasets.disable_progress_bars()
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

WORLD = 2
# 22 examples, 4 per global micro-batch, 2 micro-batches per step: an epoch is 5 full
# micro-batches and a last one of 2 (shared 1 + 1 by two ranks), i.e. 3 steps; 4 steps
# cross into the next epoch.
# Adam's step is g / (sqrt(v) + eps): with the default eps=1e-8 an element whose gradient
# is ~0 moves by +-lr depending on the sign of rounding noise, and fp32 sums over two
# ranks round differently from one process. eps=1e-6 keeps the step Lipschitz in the
# gradient (|d step| <= lr * |d g| / eps ~ 3e-3 * 1e-9 / 1e-6), so weights can be compared.
# device="cpu": gloo, and no CUDA context in the test process that forked ranks would inherit.
RUN = dict(
    max_steps=4, grad_accum_steps=2, save_every=2, keep_last=3, lr=3e-3, eps=1e-6, seed=11, progress=False, plot=False,
    device="cpu",
)
GLOBAL_BATCH = 4
NUM_EXAMPLES = 22


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # under and over the limit
def test_one_process_clipping_is_torch_clip_grad_norm(max_norm, grad_scale):
    """The loop's clipping (it skips torch's multiply-by-1.0 under the limit) leaves the
    same gradients and returns the same norm as torch.nn.utils.clip_grad_norm_, bitwise."""
    from fastft.train.distributed import setup_parallel

    parallel = setup_parallel(TrainConfig(distributed="none", device="cpu"))
    torch.manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (1, 7, 113, 1031)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for mine, other in zip(ours, theirs):
        mine.grad = torch.randn_like(mine) * grad_scale
        other.grad = mine.grad.clone()
    ours.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: skipped by both
    norm = parallel.clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm else float("inf"))
    assert norm == float(expected)
    assert all(torch.equal(mine.grad, other.grad) for mine, other in zip(ours, theirs))
    if max_norm and grad_scale > 1:
        assert float(torch.nn.utils.get_total_norm([p.grad for p in ours[:-1]])) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("num_examples,batch_size,world_size", [(22, 2, 2), (23, 3, 2), (13, 1, 3), (7, 4, 1), (9, 2, 4)])
def test_shards_are_disjoint_cover_the_epoch_and_match_one_process(num_examples, batch_size, world_size):
    shards = [EpochBatches(num_examples, batch_size, seed=5, world_size=world_size, rank=r) for r in range(world_size)]
    single = EpochBatches(num_examples, batch_size * world_size, seed=5)
    for epoch in (0, 1):
        per_rank = [list(s.batches(epoch)) for s in shards]
        assert len({len(batches) for batches in per_rank}) == 1  # every rank takes part in every micro-step
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # no example twice in an epoch, across ranks
        remainder = num_examples - len(seen)
        assert remainder == num_examples - shards[0].samples_per_epoch() and 0 <= remainder < world_size
        # Micro-step k of the ranks together is micro-batch k of one process with the global batch
        # (unless that one process keeps a last batch smaller than the number of ranks).
        for k, global_batch in enumerate(shards[0].global_batches(epoch)):
            assert sorted(i for batches in per_rank for i in batches[k]) == sorted(global_batch)
            assert global_batch == list(single.batches(epoch))[k]
    # Resuming at a global sample offset with another world size continues the same order.
    offset = 2 * batch_size * world_size if num_examples > 2 * batch_size * world_size else 0
    rest = [i for b in EpochBatches(num_examples, 1, seed=5).global_batches(0, start_sample=offset) for i in b]
    resumed = [i for r in range(world_size) for b in shards[r].global_batches(0, start_sample=offset) for i in shards[r].shard(b)]
    assert sorted(resumed) == sorted(rest[: len(resumed)]) and len(rest) - len(resumed) < world_size
    with pytest.raises(ValueError, match="rank"):
        EpochBatches(10, 2, world_size=2, rank=2)


# ------------------------------------------------------------------------------ harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world_size, port, work, target, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = 0
    try:
        target(rank, work, *args)
    except BaseException as error:  # noqa: BLE001 -- reported to the test through a file
        with open(os.path.join(work, f"error-{rank}.txt"), "w") as f:
            f.write(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        code = 1
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 -- a dead peer may make the teardown fail
                pass
    os._exit(code)


def spawn(target, work, *args, world_size=WORLD, timeout=120) -> list[int]:
    """Run ``target(rank, work, *args)`` in ``world_size`` forked ranks; return exit codes."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [context.Process(target=_rank_entry, args=(r, world_size, port, work, target, args)) for r in range(world_size)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + timeout
    for p in ranks:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(ranks) if p.is_alive()]
    for p in ranks:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    return [p.exitcode for p in ranks]


def read_errors(work, world_size=WORLD) -> str:
    texts = []
    for r in range(world_size):
        path = os.path.join(work, f"error-{r}.txt")
        if os.path.exists(path):
            texts.append(f"rank {r}: " + open(path).read()[-3000:])
    return "\n".join(texts)


# ---------------------------------------------------------------------- the same run


class Recorder(Callback):
    """Losses of every step."""

    def __init__(self):
        self.losses = []

    def on_step_end(self, state, metrics):
        self.losses.append(metrics["loss"])


class RecordingCollator:
    """The causal-LM collator, remembering which examples each call received."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, examples):
        self.calls.append([int(e["example_id"]) for e in examples])
        return self.inner(examples)


def tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = gpt2_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, dropout=0.0, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return transformers.GPT2LMHeadModel(config)  # tied input/output embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("distributed"))
    corpus = toy_corpus(40, seed=1)
    tokenizer = toy_tokenizer(corpus, kind="gpt")
    data, _ = prepare_lm_data(corpus, tokenizer, "clm", block_size=24)
    data = data.select(range(NUM_EXAMPLES))
    data = data.add_column("example_id", list(range(len(data))))
    return work, tokenizer, data


def run(setup, output_dir, batch_size, lora=False, callbacks=(), **overrides):
    """The shared run; returns (state, recorder, collator). ``lora``: train only LoRA
    factors (through the fused ``lora_linear``) on a frozen model."""
    work, tokenizer, data = setup
    values = {**RUN, "batch_size": batch_size, "output_dir": output_dir, **overrides}
    config = apply_overrides(TrainConfig(), resolve_kwarg_overrides(TrainConfig(), values))
    recorder, collator = Recorder(), RecordingCollator(CausalLMCollator(tokenizer))
    model = tiny_gpt2(tokenizer)
    if lora:
        import fastft.peft

        torch.manual_seed(1)
        fastft.peft.apply(model, "lora", target_modules=["c_attn", "c_fc"], rank=4, alpha=8)
    state = train(
        model, "clm", data, collator=collator, config=config, tokenizer=tokenizer, callbacks=[recorder, *callbacks],
        eval_data=data.select(range(5)),
        eval_collator=CausalLMCollator(tokenizer),
    )
    return state, recorder, collator


LORA = dict(lora=True, max_steps=2, save_every=0, export=False, lr=1e-2)


class Unfreeze(Callback):
    """Gradual unfreezing: only the last block trains, then everything from step 2 on
    (DDP registers its parameters at construction: the loop must re-wrap)."""

    def on_train_begin(self, state):
        for name, param in state.model.named_parameters():
            param.requires_grad = name.startswith("transformer.h.1.")

    def on_step_end(self, state, metrics):
        if state.step == 2:
            for param in state.model.parameters():
                param.requires_grad = True


UNFREEZE = dict(max_steps=3, save_every=0, export=False)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(setup):
    """One process, global batch 4 (fused ops on, HF export on): the full run, the LoRA
    run and the gradual-unfreezing run."""
    work = setup[0]
    state, recorder, collator = run(setup, os.path.join(work, "single"), GLOBAL_BATCH, distributed="none")
    lora, lora_recorder, _ = run(setup, os.path.join(work, "single-lora"), GLOBAL_BATCH, distributed="none", **LORA)
    unfrozen, _, _ = run(
        setup, os.path.join(work, "single-unfreeze"), GLOBAL_BATCH, distributed="none", callbacks=[Unfreeze()], **UNFREEZE
    )
    return {
        "checkpoint_at_2": os.path.join(state.output_dir, "checkpoints", "step-000002"),
        "losses": recorder.losses,
        "calls": collator.calls,
        "weights": _weights(state.model),
        "eval_loss": state.last_eval["loss"],
        "lora_losses": lora_recorder.losses,
        "lora_weights": trainable_state_dict(lora.model),
        "unfreeze_weights": _weights(unfrozen.model),
    }


def _distributed_rank(rank, work, setup, mode, reference_checkpoint):
    # From scratch with two ranks of half the batch.
    state, recorder, collator = run(setup, os.path.join(work, mode), GLOBAL_BATCH // WORLD, distributed=mode)
    weights = state.parallel.full_state_dict(state.model)  # FSDP: gathered from every rank's shards
    result = {"losses": recorder.losses, "calls": collator.calls, "export": state.export_path, "eval": state.last_eval}
    if mode == "fsdp":  # 2 -> 2 ranks: resuming the run's own step-2 checkpoint is bitwise exact
        same, recorder, _ = run(
            setup, os.path.join(work, "fsdp-again"), GLOBAL_BATCH // WORLD, distributed=mode,
            resume=os.path.join(work, mode, "checkpoints", "step-000002"), export=False,
        )
        result["same_world_losses"] = recorder.losses
        same_weights = state.parallel.full_state_dict(same.model)
        if rank == 0:
            result["same_world_bitwise"] = all(torch.equal(same_weights[k], weights[k]) for k in weights)
    if mode == "ddp":  # parameters unfrozen after wrapping are all-reduced too
        unfrozen, _, _ = run(
            setup, os.path.join(work, "ddp-unfreeze"), GLOBAL_BATCH // WORLD, distributed=mode, callbacks=[Unfreeze()], **UNFREEZE
        )
        if rank == 0:
            torch.save(_weights(unfrozen.model), os.path.join(work, "ddp-unfreeze-weights.pt"))
    if reference_checkpoint:  # 1 -> 2 ranks: resume the one-process run's step-2 checkpoint
        resumed, recorder, _ = run(
            setup, os.path.join(work, f"{mode}-resumed"), GLOBAL_BATCH // WORLD, distributed=mode, resume=reference_checkpoint
        )
        result["resumed_losses"] = recorder.losses
        resumed_weights = state.parallel.full_state_dict(resumed.model)
        if rank == 0:
            torch.save(resumed_weights, os.path.join(work, f"{mode}-resumed-weights.pt"))
    # LoRA: only the adapter factors train; their state is gathered from every rank's shards.
    lora_state, lora_recorder, _ = run(setup, os.path.join(work, f"{mode}-lora"), GLOBAL_BATCH // WORLD, distributed=mode, **LORA)
    result["lora_losses"] = lora_recorder.losses
    lora_weights = trainable_state_dict(lora_state.model)
    if rank == 0:
        torch.save(weights, os.path.join(work, f"{mode}-weights.pt"))
        torch.save(lora_weights, os.path.join(work, f"{mode}-lora-weights.pt"))
    with open(os.path.join(work, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _assert_close_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        # fp32, different reduction order (gradients summed over ranks): a few ulps of Adam updates
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(setup, reference, mode):
    work = setup[0]
    ref_losses, ref_calls, ref_weights = reference["losses"], reference["calls"], reference["weights"]
    codes = spawn(_distributed_rank, work, setup, mode, reference["checkpoint_at_2"] if mode == "ddp" else None)
    assert codes == [0] * WORLD, read_errors(work)
    results = [json.load(open(os.path.join(work, f"{mode}-rank{r}.json"))) for r in range(WORLD)]

    # Same loss trajectory (the logged loss is the global batch's) and final weights.
    assert len(ref_losses) == RUN["max_steps"] and ref_losses[-1] < ref_losses[0]
    for result in results:
        assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert result["eval"]["step"] == RUN["max_steps"] and result["eval"]["loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    _assert_close_weights(torch.load(os.path.join(work, f"{mode}-weights.pt")), ref_weights)

    # Each micro-step, the ranks' examples are disjoint and together the one process's batch.
    calls = [r["calls"] for r in results]
    assert len(calls[0]) == len(calls[1]) == len(ref_calls)
    for k, expected in enumerate(ref_calls):
        assert not set(calls[0][k]) & set(calls[1][k])
        assert sorted(calls[0][k] + calls[1][k]) == sorted(expected)
    first_epoch = [i for rank_calls in calls for call in rank_calls[:6] for i in call]  # 6 micro-batches = 1 epoch
    assert sorted(first_epoch) == list(range(NUM_EXAMPLES))  # each example exactly once, none dropped

    # Sharded checkpoints, and the export is a full Hugging Face model from rank 0.
    checkpoint = latest_checkpoint(os.path.join(work, mode, "checkpoints"))
    assert checkpoint.endswith("step-000004") and is_sharded_checkpoint(checkpoint)
    assert results[0]["export"] and not results[1]["export"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(results[0]["export"])
    _assert_close_weights(_weights(exported), ref_weights)
    assert json.load(open(os.path.join(results[0]["export"], "config.json")))["architectures"] == ["GPT2LMHeadModel"]

    # LoRA through the fused op under the wrapper: same losses, same (full) adapter weights.
    for result in results:
        assert result["lora_losses"] == pytest.approx(reference["lora_losses"], rel=1e-5)
    lora_weights = torch.load(os.path.join(work, f"{mode}-lora-weights.pt"))
    assert sorted(lora_weights) == sorted(reference["lora_weights"]) and all("lora_" in k for k in lora_weights)
    assert all(float(v.abs().max()) > 0 for k, v in lora_weights.items() if k.endswith("lora_b"))  # B left its zero init
    _assert_close_weights(lora_weights, reference["lora_weights"])

    if mode == "ddp":  # 1 -> 2 ranks: the resumed run finishes like the uninterrupted one
        for result in results:
            assert result["resumed_losses"] == pytest.approx(ref_losses[2:], rel=1e-5)
        _assert_close_weights(torch.load(os.path.join(work, "ddp-resumed-weights.pt")), ref_weights)
        _assert_close_weights(torch.load(os.path.join(work, "ddp-unfreeze-weights.pt")), reference["unfreeze_weights"])
    else:
        assert results[0]["same_world_bitwise"]
        for result in results:
            assert result["same_world_losses"] == result["losses"][2:]
        # 2 -> 1: one plain process resumes the FSDP run's sharded step-2 checkpoint
        sharded = os.path.join(work, mode, "checkpoints", "step-000002")
        resumed, recorder, _ = run(
            setup, os.path.join(work, "fsdp-to-one"), GLOBAL_BATCH, distributed="none", resume=sharded, export=False
        )
        assert resumed.step == RUN["max_steps"]
        assert recorder.losses == pytest.approx(ref_losses[2:], rel=1e-5)
        _assert_close_weights(_weights(resumed.model), ref_weights)


# -------------------------------------------------------------------------- failures


class DieAt(Callback):
    """Rank ``rank`` dies abruptly (no exception, no cleanup) at step ``step``."""

    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_step_end(self, state, metrics):
        if state.parallel.rank == self.rank and state.step == self.step:
            os._exit(17)


def _dying_rank(rank, work, setup):
    _, tokenizer, data = setup
    config = apply_overrides(
        TrainConfig(),
        resolve_kwarg_overrides(
            TrainConfig(),
            {**RUN, "max_steps": 6, "save_every": 2, "batch_size": 2, "output_dir": os.path.join(work, "dying"),
             "distributed": "ddp", "export": False, "parallel.timeout_s": 10},
        ),
    )
    train(tiny_gpt2(tokenizer), "clm", data, collator=CausalLMCollator(tokenizer), config=config, callbacks=[DieAt(1, 3)])


def test_a_dead_rank_stops_the_job_with_a_clear_error(setup):
    work = setup[0]
    started = time.monotonic()
    codes = spawn(_dying_rank, work, setup, timeout=90)
    assert codes == [1, 17]  # rank 1 died; rank 0 did not hang, it failed
    assert time.monotonic() - started < 60  # parallel.timeout_s is 10 s; a hang would take the 90 s
    message = open(os.path.join(work, "error-0.txt")).read()
    assert "rank 0 of 2 stops" in message and "another rank probably died" in message and "step-000002" in message
    # The last complete checkpoint loads (here in one process).
    checkpoint = latest_checkpoint(os.path.join(work, "dying", "checkpoints"))
    assert checkpoint.endswith("step-000002")
    model = tiny_gpt2(setup[1])
    trainer_state, _ = load_checkpoint(checkpoint, model=model, restore_rng=False)
    assert trainer_state["world_size"] == 2 and trainer_state["step"] == 2


# ----------------------------------------------------------------- torchrun + the CLI


@pytest.mark.slow
def test_torchrun_cli_pretrain_fsdp_then_resume_with_ddp_on_one_rank(tmp_path):
    """The documented command: ``torchrun --standalone --nproc_per_node 2 -m fastft pretrain``."""
    import subprocess
    import sys

    corpus = toy_corpus(60, seed=0)
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    tokenizer = toy_tokenizer(corpus)
    config = bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, dropout=0.1, pad_token_id=tokenizer.pad_token_id)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    out = tmp_path / "out"
    common = [
        "-m", "fastft", "pretrain", f"model.name_or_path={tmp_path / 'init'}", f"data.train={tmp_path / 'corpus.txt'}",
        "data.block_size=32", f"output_dir={out}", "progress=false", "plot=false", "parallel.timeout_s=60",
        "device=cpu",  # gloo on CPU even where GPUs exist (two ranks, maybe one GPU)
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def torchrun(nproc, *overrides):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *common, *overrides]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

    torchrun(2, "distributed=fsdp", "batch_size=2", "max_steps=3")
    checkpoint = latest_checkpoint(str(out / "checkpoints"))
    assert checkpoint.endswith("step-000003") and is_sharded_checkpoint(checkpoint)
    torchrun(1, "distributed=ddp", "batch_size=4", "max_steps=5", "resume=auto")  # 2 -> 1 rank, FSDP -> DDP
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 5]  # rank 0 alone logs (log_every=10: the last step of each run)
    model = transformers.AutoModelForMaskedLM.from_pretrained(out / "final")
    assert json.load(open(out / "final" / "config.json"))["architectures"] == ["BertForMaskedLM"]
    assert sum(p.numel() for p in model.parameters()) > 0
