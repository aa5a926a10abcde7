"""FastDropout (fastft/nn/dropout.py) and the CPU settings the recipes switch on around the
loop (``fastft.train.runtime.cpu_speedups``).

FastDropout must be dropout: each element kept independently with probability 1 - p and
scaled so the output is unbiased, a fresh mask per call, reproducible from torch's seed,
the backward the same mask; and ``nn.Dropout`` itself wherever it does not apply.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from fastft.nn.dropout import FastDropout, use_fast_dropout

from _tiny_models import bert_config  # tests/_tiny_models.py


def _within_binomial(count, trials, prob, sigmas=5.0):
    return abs(count - trials * prob) <= sigmas * math.sqrt(trials * prob * (1 - prob))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.013])
def test_keeps_each_element_with_probability_one_minus_p_and_is_unbiased(p):
    torch.manual_seed(1)
    x = torch.randn(7, 113, 257)  # odd sizes: 203,357 elements, not a multiple of 4
    y = FastDropout(p)(x)
    kept = y != 0
    rounded_p = round(p * 65536) / 65536
    assert _within_binomial(int(kept.sum()), x.numel(), 1 - rounded_p)
    # kept elements are x / P(keep) exactly (the scale of the rounded p), dropped are 0
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - rounded_p)), rtol=1e-6, atol=0)
    # each of the four 16-bit lanes drawn from one 64-bit word keeps at the same rate
    flat = kept.flatten()
    for lane in range(4):
        lane_kept = flat[lane::4]
        assert _within_binomial(int(lane_kept.sum()), lane_kept.numel(), 1 - rounded_p), lane


def test_masks_are_fresh_uncorrelated_and_reproducible():
    x = torch.randn(64, 1031)
    drop = FastDropout(0.5)
    torch.manual_seed(3)
    first, second = drop(x) != 0, drop(x) != 0
    n = first.numel()
    assert not torch.equal(first, second)
    # Pearson correlation of two 0/1 masks with p = 0.5: sd 1/sqrt(n) when independent
    a, b = first.float().flatten() - 0.5, second.float().flatten() - 0.5
    assert abs(float((a * b).mean() / 0.25)) < 5 / math.sqrt(n)
    # neighbours within one mask are independent too
    assert abs(float((a[1:] * a[:-1]).mean() / 0.25)) < 5 / math.sqrt(n)
    torch.manual_seed(3)
    assert torch.equal(drop(x) != 0, first)  # the seed comes from torch's generator
    state = torch.get_rng_state()
    third = drop(x)
    torch.set_rng_state(state)  # what a resumed checkpoint does
    assert torch.equal(drop(x), third)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_applies_the_forward_mask(dtype):
    torch.manual_seed(5)
    x = torch.randn(3, 17, 33, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 17, 33, dtype=dtype)
    y = FastDropout(0.3)(x)
    y.backward(grad)
    kept = y.detach() != 0
    scale = torch.where(kept, y.detach().float() / x.detach().float(), 0.0)  # 0 or 1/P(keep)
    torch.testing.assert_close(x.grad.float(), grad.float() * scale, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    assert y.dtype == dtype


def test_falls_back_to_nn_dropout_where_it_does_not_apply():
    x = torch.randn(5, 9)
    drop = FastDropout(0.4)
    drop.eval()
    assert torch.equal(drop(x), x)  # eval: identity
    drop.train()
    assert torch.equal(FastDropout(0.0)(x), x)
    assert torch.equal(FastDropout(1.0)(x), torch.zeros_like(x))
    meta = torch.empty(4, 6, device="meta")
    assert FastDropout(0.4)(meta).shape == (4, 6)  # not a CPU tensor: F.dropout
    assert FastDropout(0.4)(torch.empty(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError):
        FastDropout(1.5)  # nn.Dropout's own argument check


def _tiny_bert():
    config = bert_config(50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32, dropout=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_use_fast_dropout_swaps_and_restores_every_dropout():
    model = _tiny_bert()
    originals = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Dropout}
    keys = list(model.state_dict())
    ids = torch.randint(0, 50, (3, 11))
    model.eval()
    before = model(input_ids=ids).logits
    swap = use_fast_dropout(model)
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, FastDropout)}
    assert set(swapped) == set(originals) and len(swapped) >= 8
    assert all(swapped[name].p == originals[name].p for name in swapped)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: dropout is the identity
    model.train()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert math.isfinite(float(loss.detach())) and model.classifier.weight.grad.abs().sum() > 0
    swap.restore()
    assert all(dict(model.named_modules())[name] is module for name, module in originals.items())
    assert not any(isinstance(m, FastDropout) for m in model.modules())


def test_retain_freed_memory_stops_page_faults_on_a_reused_large_buffer():
    """Allocate, fill and free a 64 MiB tensor five times: without the setting each round
    page-faults the whole buffer in again (glibc returns it to the kernel on free); with it
    the memory is reused. Counted with the process's minor page faults, in fresh processes
    (the setting is process-wide and permanent)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from fastft.train.runtime import retain_freed_memory
        applied = retain_freed_memory() if sys.argv[1] == "on" else None
        def rounds():
            for _ in range(5):
                torch.empty(16 * 2**20).fill_(1.0)
        rounds()  # the first round faults the memory in either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rounds()
        print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True).stdout.split()
        faults[mode] = int(out[1])
        if mode == "on":
            assert out[0] == "True"
    pages = 5 * 64 * 2**20 // 4096
    assert faults["off"] > pages // 2, faults  # 4 KiB pages faulted in again each round
    assert faults["on"] < pages // 20, faults


def _dropout_kinds(model):
    return {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_cpu_speedups_swap_dropout_for_the_block_only(monkeypatch):
    """``cpu_speedups`` (what the recipes wrap the loop in): FastDropout and the malloc
    setting on a CPU run while the block runs, the model's own dropouts back afterwards
    (also after an error); each switch off on its own; nothing at all off the CPU."""
    from fastft.train import TrainConfig
    from fastft.train import runtime

    calls = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda: calls.append(1) or True)  # process-wide: not for real
    model = _tiny_bert()
    originals = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Dropout}
    with runtime.cpu_speedups(model, TrainConfig(device="cpu")) as inside:
        assert inside is model and _dropout_kinds(model) == {FastDropout} and calls == [1]
    assert all(dict(model.named_modules())[name] is module for name, module in originals.items())
    with pytest.raises(RuntimeError, match="inside"):
        with runtime.cpu_speedups(model, TrainConfig(device="cpu")):
            assert _dropout_kinds(model) == {FastDropout}
            raise RuntimeError("inside")
    assert _dropout_kinds(model) == {torch.nn.Dropout}
    calls.clear()
    with runtime.cpu_speedups(model, TrainConfig(device="cpu", fast_dropout=False)):
        assert _dropout_kinds(model) == {torch.nn.Dropout} and calls == [1]
    with runtime.cpu_speedups(model, TrainConfig(device="cpu", retain_freed_memory=False)):
        assert _dropout_kinds(model) == {FastDropout} and calls == [1]
    with runtime.cpu_speedups(model, TrainConfig(device="meta")):  # not a CPU run
        assert _dropout_kinds(model) == {torch.nn.Dropout} and calls == [1]


def test_the_recipes_not_the_loop_swap_dropout(tmp_path):
    """``train`` alone keeps the model's dropouts (the engine stays device-agnostic);
    ``fastft.pretrain`` on a CPU trains with FastDropout and hands the model back with its own."""
    import fastft
    from fastft.data import prepare_lm_data, toy_corpus, toy_tokenizer
    from fastft.train import Callback, TrainConfig, train

    class SeesDropout(Callback):
        def __init__(self):
            self.kinds = []

        def on_step_end(self, state, metrics):
            self.kinds.append(_dropout_kinds(state.model))

    texts = toy_corpus(16, seed=0)
    tokenizer = toy_tokenizer(texts)
    quiet = dict(max_steps=1, batch_size=4, device="cpu", fused=False, progress=False, plot=False, export=False)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config(len(tokenizer), hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=32, dropout=0.1))
    data, collator = prepare_lm_data(texts, tokenizer, "mlm", block_size=32)
    seen = SeesDropout()
    train(model, "mlm", data, collator=collator, config=TrainConfig(output_dir=str(tmp_path / "loop"), **quiet),
          callbacks=[seen])
    assert seen.kinds == [{torch.nn.Dropout}]
    seen = SeesDropout()
    state = fastft.pretrain(model, tokenizer, texts, "mlm", output_dir=str(tmp_path / "recipe"), block_size=32,
                            callbacks=[seen], **quiet)
    assert seen.kinds == [{FastDropout}]
    assert state.model is model and _dropout_kinds(model) == {torch.nn.Dropout}
