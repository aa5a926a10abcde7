"""Mixed precision on the CPU (issue 16): every op, a patched model and the loop under
``torch.autocast("cpu", bfloat16)`` / ``precision="bf16"``, against the fp32 reference.

Tolerance rule (tests/_tolerance.py): under autocast the "plain" computation is the
unfused one run under the same autocast (bf16 matmuls), so fastft's error against the fp32
reference may be at most twice that of the code people would otherwise run. Outputs and
every gradient, fresh random inputs, odd sizes. The native-bf16 CPU path (bf16 operands,
fp32 accumulation: ``fastft._precision``) runs here under ``FASTFT_CPU_BF16=1``; on a CPU
without bf16 instructions oneDNN then multiplies in fp32, so that its *speed* and bf16
*rounding* can only be observed on a CPU with AMX / AVX512-BF16 (the benchmark says so).
"""

import importlib
import logging
import warnings

import pytest
import torch
from _tolerance import assert_tolerance_rule

import fastft
from fastft import _precision
from fastft.models import is_patched
from fastft.ops import attention, attention_ref, linear_cross_entropy, linear_cross_entropy_ref, lora_linear
from fastft.ops.attention import draw_dropout_seed, torch_dropout_mask
from fastft.ops.lora_linear import dropout_keep_mask, lora_linear_ref
from fastft.train.config import TrainConfig
from fastft.train.runtime import autocast, resolve_precision, with_precision_resolved

lce_module = importlib.import_module("fastft.ops.linear_cross_entropy")  # the package re-exports the function name

BF16_ATOL = 1e-2  # relative to the reference's largest magnitude (as the op tests' bf16 atol)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(params=["detected", "native"])
def cpu_path(request, monkeypatch):
    """Both CPU loss paths: as detected here, and the native-bf16 one (forced)."""
    if request.param == "native":
        monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")
    else:
        monkeypatch.delenv(_precision.ENV_OVERRIDE, raising=False)
    return request.param


def _grads(loss_or_out, leaves, upstream=None):
    target = loss_or_out if upstream is None else (loss_or_out.float() * upstream).sum()
    return list(torch.autograd.grad(target, leaves))


# ------------------------------------------------------------------ linear_cross_entropy


def _lce_case(rows, hidden_size, vocab, *, bias, ignored=0.4, hidden_dtype=torch.float32):
    hidden = torch.randn(rows, hidden_size).to(hidden_dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()  # fp32 master
    b = (0.5 * torch.randn(vocab)).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < ignored] = -100
    return hidden, weight, b, labels


def _lce_run(fn, hidden, weight, bias, labels, reduction, smoothing, *, under_autocast, backward_inside=False):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    with bf16_autocast() if under_autocast else torch.autocast("cpu", enabled=False):
        loss = fn(hidden, weight, labels, bias=bias, reduction=reduction, label_smoothing=smoothing)
        if backward_inside:
            grads = _grads(loss, leaves, upstream)
    if not backward_inside:
        grads = _grads(loss, leaves, upstream)
    return [loss.detach().float()] + grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows,hidden_size,vocab", [(1, 16, 50), (7, 40, 1), (113, 48, 1023)])
def test_loss_under_autocast_matches_fp32_reference(cpu_path, reduction, rows, hidden_size, vocab):
    """fp32 inputs (master weights) under bf16 autocast: loss and every gradient."""
    hidden, weight, bias, labels = _lce_case(rows, hidden_size, vocab, bias=True)
    args = (hidden, weight, bias, labels, reduction, 0.1)
    fused = _lce_run(linear_cross_entropy, *args, under_autocast=True, backward_inside=reduction == "sum")
    reference = _lce_run(linear_cross_entropy_ref, *args, under_autocast=False)
    plain = _lce_run(lambda *a, **k: linear_cross_entropy_ref(*a, upcast=False, **k), *args, under_autocast=True)
    assert fused[0].dtype == torch.float32
    for name, f, r, p in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], fused, reference, plain):
        assert f.dtype == p.dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        assert_tolerance_rule(f"{cpu_path} {reduction} {name}", f, r, p, atol=BF16_ATOL, relative_atol=True)


def test_loss_with_bf16_hidden_and_fp32_head_under_autocast(cpu_path):
    """What a patched model passes under autocast: bf16 hidden states, the fp32 head."""
    hidden, weight, bias, labels = _lce_case(113, 32, 333, bias=True, hidden_dtype=torch.bfloat16)
    args = (hidden, weight, bias, labels, "mean", 0.0)
    fused = _lce_run(linear_cross_entropy, *args, under_autocast=True)
    reference = _lce_run(linear_cross_entropy_ref, *args, under_autocast=False)
    plain = _lce_run(lambda *a, **k: linear_cross_entropy_ref(*a, upcast=False, **k), *args, under_autocast=True)
    assert [t.dtype for t in fused[1:]] == [torch.bfloat16, torch.float32, torch.float32]
    for name, f, r, p in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], fused, reference, plain):
        assert_tolerance_rule(f"{cpu_path} {name}", f, r, p, atol=BF16_ATOL, relative_atol=True)


def test_loss_without_gradients_under_autocast_keeps_fp32_logits():
    """No grad under autocast: the loss is computed with fp32 logits where the CPU has no
    native bf16 (it used to take bf16 logits, ~30x the error): fp32 error, not bf16's."""
    hidden, weight, _, labels = _lce_case(257, 64, 999, bias=False, ignored=0.0)
    exact = linear_cross_entropy_ref(hidden.double(), weight.double(), labels)
    with torch.no_grad():
        fp32_plain = linear_cross_entropy_ref(hidden, weight, labels, upcast=False)
        with bf16_autocast():
            fused = linear_cross_entropy(hidden, weight, labels)
            bf16_plain = linear_cross_entropy_ref(hidden, weight, labels, upcast=False)
    bf16_error = (bf16_plain.double() - exact).abs().item()
    if _precision.loss_matmul_precision(torch.bfloat16, hidden.device) == "ieee":
        assert (fused.double() - exact).abs().item() <= 2 * (fp32_plain.double() - exact).abs().item() + 1e-6
        assert bf16_error > 1e-5  # the test can tell bf16 logits apart from fp32 ones
    else:  # bf16 operands, fp32 accumulation: within the tolerance rule of plain bf16
        assert (fused.double() - exact).abs().item() <= 2 * bf16_error + 1e-3


def test_native_bf16_path_multiplies_in_bf16_mode(monkeypatch):
    """With native bf16 (forced), every matmul of the loss runs with oneDNN's fp32 math
    mode at bf16 (bf16 operands, fp32 accumulation) and the mode is restored afterwards;
    without it, every matmul runs at fp32 ("ieee" leaves the mode alone)."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    modes = []  # oneDNN's fp32 math mode at each matmul call

    def recording(function):
        def wrapper(*args, **kwargs):
            modes.append(matmul.fp32_precision)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "mm", recording(torch.mm))
    monkeypatch.setattr(torch.Tensor, "addmm_", recording(torch.Tensor.addmm_))
    for override, dtype, expected in [("1", torch.bfloat16, "bf16"), ("1", torch.float32, before),
                                      ("1", torch.float16, before), ("0", torch.bfloat16, before)]:
        monkeypatch.setenv(_precision.ENV_OVERRIDE, override)
        vocab = 40000
        rows = 2 * (lce_module.CHUNK_LOGITS // vocab) + 7  # three chunks of rows
        hidden, weight, _, labels = _lce_case(rows, 16, vocab, bias=False, ignored=0.0)
        hidden, weight = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        modes.clear()
        linear_cross_entropy(hidden, weight, labels).backward()
        assert len(modes) == 3 * 3 and set(modes) == {expected}, (override, dtype, modes)  # 3 GEMMs per chunk
        assert matmul.fp32_precision == before


def test_cpu_matmul_precision_restores_the_mode_on_error():
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with _precision.cpu_matmul_precision("bf16"):
            assert matmul.fp32_precision == "bf16"
            raise RuntimeError("inside")
    assert matmul.fp32_precision == before


def test_reduced_loss_gradient_is_scaled_in_place(monkeypatch):
    """loss.backward(): the weight gradient autograd stores is the buffer the forward pass
    computed (scaled in place, no second copy); with retain_graph a second backward still
    gets the right gradient (the saved buffers are then left alone)."""
    hidden, weight, _, labels = _lce_case(37, 24, 90, bias=False)
    buffers = []
    rows = lce_module._rows_torch

    def recording_rows(*args):
        result = rows(*args)
        buffers.append(result[2].data_ptr())  # the address only: a reference would force a copy
        return result

    monkeypatch.setattr(lce_module, "_rows_torch", recording_rows)
    expected = torch.autograd.grad(3.0 * linear_cross_entropy_ref(hidden, weight, labels), weight)[0]
    (3.0 * linear_cross_entropy(hidden, weight, labels)).backward()
    assert weight.grad.data_ptr() == buffers[-1]
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)

    weight.grad = None
    loss = 3.0 * linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_logits", [1, 5000])
def test_all_rows_labelled_with_several_chunks(monkeypatch, chunk_logits):
    """Causal-LM mode (no row ignored: no gather / scatter) over 1-row and multi-row
    chunks, fp32, against a float64 reference."""
    monkeypatch.setattr(lce_module, "CHUNK_LOGITS", chunk_logits)
    hidden, weight, bias, labels = _lce_case(113, 24, 97, bias=True, ignored=0.0)
    hidden64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    for reduction in ("mean", "none"):
        fused = _lce_run(linear_cross_entropy, hidden, weight, bias, labels, reduction, 0.05, under_autocast=False)
        reference = _lce_run(linear_cross_entropy_ref, hidden64, weight64, bias64, labels, reduction, 0.05,
                             under_autocast=False)
        plain = _lce_run(lambda *a, **k: linear_cross_entropy_ref(*a, upcast=False, **k), hidden, weight, bias, labels,
                         reduction, 0.05, under_autocast=False)
        for name, f, r, p in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], fused, reference, plain):
            assert_tolerance_rule(f"{reduction} {name}", f, r, p, atol=1e-5, relative_atol=True)


# ------------------------------------------------------------------------- lora_linear


@pytest.mark.parametrize("tokens", [1, 7, 113])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_linear_under_autocast_is_nn_linear_like(tokens, dropout_p):
    """fp32 x, frozen W, bias, A, B under autocast: bf16 output (as nn.Linear there), fp32
    gradients for x, A, B, within the rule of the unfused LoRA under the same autocast."""
    in_features, out_features, rank, scaling, seed = 37, 29, 3, 2.0, 11
    x = torch.randn(tokens, in_features, requires_grad=True)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    bias = torch.randn(out_features)
    lora_a = (torch.randn(rank, in_features) / in_features**0.5).requires_grad_()
    lora_b = (torch.randn(out_features, rank) / rank**0.5).requires_grad_()
    leaves = [x, lora_a, lora_b]
    mask = dropout_keep_mask(seed, dropout_p, tokens, in_features) if dropout_p else None
    upstream = torch.randn(tokens, out_features)

    def run(fn, under_autocast):
        with bf16_autocast() if under_autocast else torch.autocast("cpu", enabled=False):
            out = fn()
            grads = _grads(out, leaves, upstream)  # backward inside the block, as some loops do
        return [out] + grads

    fused = run(lambda: lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p, seed=seed), True)
    ref_args = (x, weight, bias, lora_a, lora_b, scaling)
    reference = run(lambda: lora_linear_ref(*ref_args, dropout_mask=mask, dropout_p=dropout_p), False)
    plain = run(lambda: lora_linear_ref(*ref_args, dropout_mask=mask, dropout_p=dropout_p, upcast=False), True)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    assert [g.dtype for g in fused[1:]] == [torch.float32] * 3
    for name, f, r, p in zip(["y", "dx", "dA", "dB"], fused, reference, plain):
        assert_tolerance_rule(name, f, r, p, atol=BF16_ATOL, relative_atol=True)


def test_lora_dropout_gradient_of_a_accumulates_in_fp32(monkeypatch):
    """bf16 inputs with dropout over many mask chunks: dA is summed in fp32 across chunks,
    so it stays within the rule of one bf16 matmul over all tokens (a bf16 running sum
    would round at every chunk)."""
    monkeypatch.setattr(importlib.import_module("fastft.ops.lora_linear"), "MASK_CHUNK_ELEMENTS", 64 * 8)
    tokens, in_features, out_features, rank, seed, p = 1023, 64, 16, 4, 5, 0.25
    x = torch.randn(tokens, in_features).bfloat16().requires_grad_()
    weight = (torch.randn(out_features, in_features) / 8).bfloat16()
    lora_a = (torch.randn(rank, in_features) / 8).bfloat16().requires_grad_()
    lora_b = torch.randn(out_features, rank).bfloat16().requires_grad_()
    mask = dropout_keep_mask(seed, p, tokens, in_features)
    upstream = torch.randn(tokens, out_features)
    fused = _grads(lora_linear(x, weight, None, lora_a, lora_b, 1.0, dropout_p=p, seed=seed), [lora_a], upstream)[0]
    leaves32 = [t.detach().float().requires_grad_() for t in (x, lora_a, lora_b)]
    exact = _grads(lora_linear_ref(leaves32[0], weight, None, leaves32[1], leaves32[2], 1.0, dropout_mask=mask,
                                   dropout_p=p), [leaves32[1]], upstream)[0]
    plain = _grads(lora_linear_ref(x, weight, None, lora_a, lora_b, 1.0, dropout_mask=mask, dropout_p=p,
                                   upcast=False), [lora_a], upstream)[0]
    assert_tolerance_rule("dA", fused, exact, plain, atol=1e-3, relative_atol=True)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", ["causal", "padded", "varlen", "dropout"])
def test_attention_under_autocast(kind):
    """fp32 q, k, v under autocast: bf16 output as SDPA there, fp32 gradients, within the
    rule of the reference computed on the bf16-cast inputs (the unfused bf16 model)."""
    torch.manual_seed(3)
    kwargs, ref_kwargs, generator = {}, {}, None
    if kind == "varlen":
        lengths = [5, 1, 17]
        shapes = [(sum(lengths), 4, 24), (sum(lengths), 2, 24), (sum(lengths), 2, 24)]
        cu_seqlens = torch.tensor([0, 5, 6, 23], dtype=torch.int32)
        kwargs = ref_kwargs = dict(cu_seqlens=cu_seqlens, causal=True)
    else:
        shapes = [(2, 4, 33, 24), (2, 2, 33, 24), (2, 2, 33, 24)]
        if kind == "causal":
            kwargs = ref_kwargs = dict(causal=True)
        elif kind == "padded":
            mask = torch.ones(2, 33, dtype=torch.bool)
            mask[0, 20:] = False
            kwargs = ref_kwargs = dict(key_padding_mask=mask)
        else:
            p = 0.2
            generator = torch.Generator().manual_seed(9)
            seed = int(draw_dropout_seed(torch.Generator().manual_seed(9)))
            keep = torch_dropout_mask(seed, 2, 4, 33, 33, p)
            kwargs = dict(dropout_p=p, generator=generator)
            ref_kwargs = dict(dropout_mask=keep, dropout_p=p)
    q, k, v = (torch.randn(s, requires_grad=True) for s in shapes)
    upstream = torch.randn(shapes[0])
    with bf16_autocast():
        out = attention(q, k, v, **kwargs)
        fused = [out] + _grads(out, [q, k, v], upstream)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[1:])
    reference = attention_ref(q, k, v, **ref_kwargs)
    reference = [reference] + _grads(reference, [q, k, v], upstream)
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    plain = attention_ref(q16, k16, v16, upcast=False, **ref_kwargs)
    plain = [plain] + [g.float() for g in _grads(plain, [q16, k16, v16], upstream)]
    for name, f, r, p in zip(["out", "dq", "dk", "dv"], fused, reference, plain):
        assert_tolerance_rule(f"{kind} {name}", f, r, p, atol=BF16_ATOL, relative_atol=True)


# ----------------------------------------------------------------- a patched model, the loop


@pytest.fixture(scope="module")
def toy():
    from fastft.data import toy_corpus, toy_tokenizer

    corpus = toy_corpus(60, seed=0)
    return corpus, toy_tokenizer(corpus), toy_tokenizer(corpus, kind="gpt")


def _tiny_model(family, tokenizer, attn):
    transformers = pytest.importorskip("transformers")
    from _tiny_models import bert_config, llama_config

    if family == "bert":
        config = bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, dropout=0.0,
                             pad_token_id=tokenizer.pad_token_id)
        config._attn_implementation = attn
        return transformers.BertForMaskedLM(config)
    config = llama_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_patched_model_under_autocast_matches_fp32(toy, family):
    """A fastft-patched model (fused attention + loss) under bf16 autocast: the loss and
    every parameter's gradient against the fp32 model, within the rule of the unpatched
    model under the same autocast; master weights and their gradients stay fp32."""
    _, bert_tokenizer, gpt_tokenizer = toy
    tokenizer = bert_tokenizer if family == "bert" else gpt_tokenizer
    torch.manual_seed(0)
    plain_model = _tiny_model(family, tokenizer, "sdpa")
    fused_model = fastft.patch(_tiny_model(family, tokenizer, "sdpa"))
    fused_model.load_state_dict(plain_model.state_dict())
    input_ids = torch.randint(5, len(tokenizer), (3, 29))
    labels = input_ids.clone()
    if family == "bert":
        labels[torch.rand(labels.shape) > 0.3] = -100
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)

    def loss_and_grads(model, precision):
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), precision):
            loss = model(**batch).loss
        loss.backward()
        return [loss.detach().float()] + [p.grad for _, p in sorted(model.named_parameters())]

    names = ["loss"] + [n for n, _ in sorted(plain_model.named_parameters())]
    reference = loss_and_grads(plain_model, "fp32")
    plain = loss_and_grads(plain_model, "bf16")
    fused = loss_and_grads(fused_model, "bf16")
    assert all(p.dtype == torch.float32 for p in fused_model.parameters())
    for name, f, r, p in zip(names, fused, reference, plain):
        assert f.dtype == torch.float32, name
        assert_tolerance_rule(f"{family} {name}", f, r, p, atol=BF16_ATOL, relative_atol=True)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pretrain_bf16_on_cpu_with_fused_kernels(toy, tmp_path, family, monkeypatch):
    """precision="bf16" through the loop with fastft.patch on: it used to crash on the
    first step. The masked-LM / causal-LM loss is fp32 and the weights stay fp32."""
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")  # no "will be slower" warning on this test's path
    corpus, bert_tokenizer, gpt_tokenizer = toy
    tokenizer = bert_tokenizer if family == "bert" else gpt_tokenizer
    model = _tiny_model(family, tokenizer, "sdpa")
    state = fastft.pretrain(model, tokenizer, {"train": corpus[:24], "validation": corpus[24:32]},
                            "mlm" if family == "bert" else "clm", output_dir=str(tmp_path), max_steps=2, batch_size=4,
                            block_size=32, precision="bf16", progress=False, plot=False, export=False)
    assert state.step == 2 and state.config.precision == "bf16"
    assert torch.isfinite(torch.tensor(state.last_train["loss"])) and state.last_eval["loss"] < 10
    assert is_patched(model)  # the loop's fastft.patch: fused attention and loss
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_pretrain_fp16_on_cpu_names_bf16_and_writes_nothing(toy, tmp_path):
    corpus, tokenizer, _ = toy
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="precision='bf16'"):
        fastft.pretrain(_tiny_model("bert", tokenizer, "sdpa"), tokenizer, corpus[:8], "mlm", output_dir=str(out),
                        max_steps=1, batch_size=4, block_size=32, precision="fp16", device="cpu", progress=False)
    assert not out.exists()


# ------------------------------------------------------------------ choosing a precision


def test_detection_reads_x86_and_arm_flags():
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    old = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
    assert _precision.bf16_flags(x86) == ("amx_bf16", "avx512_bf16")
    assert _precision.bf16_flags(arm) == ("bf16",)
    assert _precision.bf16_flags(old) == () and _precision.bf16_flags("") == ()


def test_detection_and_its_override(monkeypatch):
    monkeypatch.delenv(_precision.ENV_OVERRIDE, raising=False)
    found = _precision.cpu_bf16()
    assert found.native == (bool(found.flags) and torch.backends.mkldnn.is_available())
    assert found.isa == torch.backends.cpu.get_cpu_capability() and found.cpu in found.describe()
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")
    assert _precision.cpu_bf16().native and "overrides" in _precision.cpu_bf16().describe()
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    assert not _precision.cpu_bf16().native
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "yes")
    with pytest.raises(ValueError, match="auto, 0 or 1"):
        _precision.cpu_bf16()


def test_loss_matmul_precision_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")
    assert _precision.loss_matmul_precision(torch.bfloat16, cpu) == "bf16"
    assert _precision.loss_matmul_precision(torch.float32, cpu) == "ieee"
    assert _precision.loss_matmul_precision(torch.float16, cpu) == "ieee"
    assert _precision.loss_matmul_precision(torch.bfloat16, torch.device("meta")) == "ieee"
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    assert _precision.loss_matmul_precision(torch.bfloat16, cpu) == "ieee"


@pytest.mark.parametrize("native", ["1", "0"])
def test_auto_precision_on_the_cpu_is_logged(monkeypatch, capsys, caplog, native):
    monkeypatch.setenv(_precision.ENV_OVERRIDE, native)
    expected = "bf16" if native == "1" else "fp32"
    with caplog.at_level(logging.INFO, logger="fastft.train"):
        assert resolve_precision("auto", torch.device("cpu"), announce=True) == expected
    assert f"precision=auto -> {expected}" in capsys.readouterr().err
    assert f"precision=auto -> {expected}" in caplog.text
    config = with_precision_resolved(TrainConfig(precision="auto", device="cpu", output_dir="unused"))
    assert config.precision == expected
    assert TrainConfig(precision="fp32").precision == "fp32"  # concrete precisions stay as given


def test_bad_precisions_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for native in ("1", "0"):
        monkeypatch.setenv(_precision.ENV_OVERRIDE, native)
        with pytest.raises(ValueError, match="precision='fp16' is not supported on the CPU.*precision='bf16'"):
            resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="fp32, bf16, fp16, auto"):
        resolve_precision("int8", cpu)


def test_bf16_without_native_bf16_warns_with_the_measured_reason(monkeypatch):
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    with pytest.warns(UserWarning, match=r"slower than fp32.*bf16 [0-9.]+ GFLOP/s, fp32 [0-9.]+ GFLOP/s"):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_info_reports_bf16_and_the_recommendation(monkeypatch):
    from fastft.info import precision_lines

    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    text = "\n".join(precision_lines(torch.device("cpu"), measure=False))
    assert _precision.cpu_bf16().describe() in text and "precision=auto): fp32" in text
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")
    assert "precision=auto): bf16" in "\n".join(precision_lines(torch.device("cpu"), measure=False))


def test_matmul_gflops_measures_and_restores_threads():
    threads = torch.get_num_threads()
    assert _precision.matmul_gflops(torch.float32, (16, 32, 32), repeat=2) > 0
    assert torch.get_num_threads() == threads

