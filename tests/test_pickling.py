"""Models patched by ``fastft.patch`` or accelerated by ``fastft.peft.accelerate`` survive
``pickle`` and ``torch.save(model)`` + ``torch.load``: the loaded model is still patched
(its forward still fused, its LoRA layers still on ``lora_linear``) and computes what the
original did. Before, the replacements were bound methods of module functions stored on
the layers, which pickle as ``getattr(layer, name)`` and fail on load (``'Linear' object
has no attribute '_fused_forward'``)."""

from __future__ import annotations

import copy
import importlib
import io
import pickle
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastft  # noqa: E402
import fastft.models  # noqa: E402

from _tiny_models import gpt2_config, llama_config  # noqa: E402

VOCAB = 113


@pytest.fixture(autouse=True)
def _torch_backends(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "torch")


def _round_trips(model):
    """The model through pickle, and through torch.save / torch.load (whole-model, so
    weights_only=False as torch requires for it)."""
    yield "pickle", pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)


def _spy(monkeypatch, module_name, function):
    module = importlib.import_module(module_name)
    real, calls = getattr(module, function), []
    monkeypatch.setattr(module, function, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_patched_model_round_trips(monkeypatch):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(
        gpt2_config(VOCAB, hidden_size=48, num_attention_heads=4, bos_token_id=0, eos_token_id=0),
        attn_implementation="sdpa").eval()
    fastft.patch(model)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(input_ids=input_ids, labels=input_ids).loss
    attention_calls = _spy(monkeypatch, "fastft.ops.attention", "attention")
    for how, loaded in _round_trips(model):
        assert fastft.models.is_patched(loaded), how
        assert loaded.forward.model is loaded and loaded.get_output_embeddings().forward.head is not model.lm_head
        assert loaded.config._attn_implementation == "fastft"
        attention_calls.clear()
        out = loaded(input_ids=input_ids, labels=input_ids)
        assert out.logits is None, how  # the fused loss, still
        assert len(attention_calls) == loaded.config.n_layer, how
        torch.testing.assert_close(out.loss, expected, atol=0, rtol=0, msg=how)
        # Without labels the head computes logits as usual; unpatch still restores everything.
        assert loaded(input_ids=input_ids).logits.shape == (2, 9, VOCAB)
        fastft.unpatch(loaded)
        assert "forward" not in loaded.__dict__ and "forward" not in loaded.lm_head.__dict__
    twin = copy.deepcopy(model)  # deepcopy still rebinds to the copy
    assert twin.forward.model is twin and twin.lm_head.forward.head is twin.lm_head


def test_accelerated_peft_model_round_trips(monkeypatch):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = transformers.LlamaForCausalLM._from_config(
        llama_config(VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37),
        attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    for name, parameter in model.named_parameters():  # non-zero B: the adapters change the output
        if "lora_B" in name:
            parameter.data.normal_()
    fastft.peft.accelerate(model)
    model.eval()
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    lora_calls = _spy(monkeypatch, "fastft.peft.interop", "lora_linear")
    layers = 2 * base.config.num_hidden_layers  # q_proj and v_proj
    for how, loaded in _round_trips(model):
        lora_calls.clear()
        with torch.no_grad():
            logits = loaded(input_ids=input_ids).logits
        assert len(lora_calls) == layers, how  # every LoRA layer still takes the fused path
        torch.testing.assert_close(logits, expected, atol=0, rtol=0, msg=how)
        with torch.no_grad(), loaded.disable_adapter():  # the layer's own forward behind it still works
            plain = loaded(input_ids=input_ids).logits
        assert not torch.allclose(plain, expected)
