"""fastft.peft on tiny random Hugging Face models: injection, freezing, training, merge,
PEFT-format round trips in both directions, accelerate(peft_model), errors."""

import ast
import copy
import pathlib
from unittest import mock

import pytest
import torch
import transformers

import fastft.peft as fp
from fastft.nn import LoRALinear
from fastft.ops.lora_linear import lora_linear

from _tiny_models import bert_config, distilbert_config, gpt2_config, llama_config, roberta_config  # tests/_tiny_models.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


VOCAB = 61


def tiny_bert():
    config = bert_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         max_position_embeddings=64, dropout=0.0, num_labels=3, initializer_range=0.2)
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2():
    config = gpt2_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         dropout=0.1, bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    config = llama_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=37, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                          pad_token_id=0, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config)


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def make_batch(kind, batch=4, length=7, seed=0):
    """Classification: random tokens, label = first token mod 3. Causal LM: a learnable
    rule, a cycle through 5 tokens from a random phase (next token = f(current token))."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # some padding
    if kind == "bert":
        ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
        labels = ids[:, 0] % 3
    else:
        phase = torch.randint(0, 5, (batch, 1), generator=generator)
        ids = 1 + (phase + torch.arange(length)) % 5  # (batch, length)
        labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def randomise_lora(model):
    """B is zero at init (the model equals the base); tests need a nonzero update."""
    with torch.no_grad():
        for layer in fp.lora_layers(model).values():
            layer.lora_b.normal_(0.0, 0.3)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind", MODELS)
def test_lora_injection_targets_and_heads(kind):
    model = MODELS[kind]()
    base_out = logits(model.eval(), make_batch(kind))
    fp.apply(model, "lora", target_modules="all-linear", rank=4, alpha=8)
    layers = fp.lora_layers(model)
    assert layers and all(isinstance(m, LoRALinear) for m in layers.values())
    names = set(layers)
    assert not any(name.endswith(("lm_head", "classifier", "score")) for name in names)  # heads excluded
    if kind == "bert":
        assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"} <= names
        assert fp.state.peft_state(model).modules_to_save == ["classifier"]
    if kind == "gpt2":  # Conv1D layers are adapted too
        assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    close(logits(model, make_batch(kind)), base_out, 0)  # B = 0: starts as the base model

    suffix_model = MODELS[kind]()
    target = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[kind]
    fp.apply(suffix_model, "lora", target_modules=target, rank=2)
    assert len(fp.lora_layers(suffix_model)) == 2 * len(target)
    regex_model = MODELS[kind]()
    fp.apply(regex_model, "lora", target_modules=r".*\.(" + "|".join(target) + ")", rank=2)
    assert set(fp.lora_layers(regex_model)) == set(fp.lora_layers(suffix_model))


@pytest.mark.parametrize("kind", MODELS)
def test_merged_model_gives_unmerged_outputs(kind):
    model = MODELS[kind]()
    fp.apply(model, "lora", rank=4, alpha=8, rslora=(kind == "llama"))
    randomise_lora(model)
    model.eval()
    batch = make_batch(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, batch)
    fp.merge(model)
    close(logits(model, batch), unmerged, 1e-4)
    with pytest.raises(RuntimeError, match="already merged"):
        fp.merge(model)
    fp.unmerge(model)
    close(logits(model, batch), unmerged, 1e-4)
    for name, param in model.named_parameters():
        if name in weights:
            close(param, weights[name], 1e-6)


# --------------------------------------------------------------------------- every method

METHOD_CONFIGS = {
    "lora": dict(rank=4, alpha=8, dropout=0.1),
    "adapter": dict(bottleneck_size=8),
    "prefix": dict(num_virtual_tokens=4, projection_hidden_size=24),
    "prompt": dict(num_virtual_tokens=4),
}
CASES = [("lora", "bert"), ("lora", "gpt2"), ("adapter", "bert"), ("adapter", "llama"),
         ("prefix", "bert"), ("prefix", "gpt2"), ("prefix", "llama"), ("prompt", "bert"), ("prompt", "llama")]


def adapter_parameter_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,kind", CASES)
def test_only_adapter_parameters_train_base_bitwise_unchanged(method, kind):
    model = MODELS[kind]()
    fp.apply(model, method, **METHOD_CONFIGS[method])
    trainable = adapter_parameter_names(model)
    fastft_markers = ("lora_", "fastft_adapters.", "fastft_prefix.", "fastft_prompt.", "classifier.")
    assert trainable and all(any(m in name for m in fastft_markers) for name in trainable), trainable
    if kind == "bert":
        assert {"classifier.weight", "classifier.bias"} <= trainable
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(**make_batch(kind, seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        for name, param in model.named_parameters():
            if name in trainable:
                assert param.grad is not None, f"no gradient reached {name}"
            else:
                assert param.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"base parameter {name} changed"
        else:
            assert not torch.equal(param, trainable_before[name]), f"{name} did not train"
    report = fp.trainable_parameters_report(model)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.by_group[method] > 0 and sum(report.by_group.values()) == report.trainable
    assert 0 < report.percent < 100 and "trainable%" in str(report)


# Learning rates: 3e-2 for the weight-space methods; prompt tuning needs far larger
# steps (Lester et al. 2021 train soft prompts with lr 0.3). Thresholds: the fraction of
# the initial loss left after 20 steps, with margin over what was measured (lora-llama
# ~0.01, adapter-gpt2 ~0.4, prefix-llama ~0.15, prompt-gpt2 ~0.6, lora-bert ~0.01,
# prompt-bert ~0.4).
TRAINING_CASES = [("lora", "llama", 3e-2, 0.1), ("adapter", "gpt2", 3e-2, 0.6), ("prefix", "llama", 3e-2, 0.4),
                  ("prompt", "gpt2", 0.3, 0.8), ("lora", "bert", 1e-2, 0.2), ("prompt", "bert", 0.3, 0.7)]


@pytest.mark.parametrize("method,kind,lr,fraction_left", TRAINING_CASES)
def test_each_method_trains_the_loss_down(method, kind, lr, fraction_left):
    """20 steps on a fixed small synthetic batch (see make_batch) lower the loss a lot."""
    model = MODELS[kind]()
    fp.apply(model, method, **{**METHOD_CONFIGS[method], **({"dropout": 0.0} if method == "lora" else {})})
    batch = make_batch(kind, batch=8, length=9)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < fraction_left * losses[0], (losses[0], losses[-1])


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("kind", MODELS)
def test_adapters_after_attention_and_feed_forward_of_each_layer(kind):
    model = MODELS[kind]()
    batch = make_batch(kind)
    base_out = logits(model.eval(), batch)
    fp.apply(model, "adapter", bottleneck_size=5)
    hosts = fp.state.peft_state(model).config["adapter"]["hosts"]
    expected = {
        "bert": ["bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"],
        "gpt2": ["transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"],
        "llama": ["model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"],
    }[kind]
    assert hosts == [pattern.format(layer) for layer in range(2) for pattern in expected]
    assert len(model.fastft_adapters) == 4
    out = logits(model, batch)
    assert not torch.equal(out, base_out)  # the adapters are in the forward pass...
    close(out, base_out, 0.05)  # ...and start near the identity
    # An adapter hook sits on the sublayer output: zeroing its up-projection restores the base.
    with torch.no_grad():
        for adapter in model.fastft_adapters.values():
            adapter.up.weight.zero_()
    close(logits(model, batch), base_out)


def test_adapter_follows_lora_when_both_are_applied():
    model = tiny_bert().eval()
    fp.apply(model, "adapter", bottleneck_size=4)
    fp.apply(model, "lora", target_modules=["attention.output.dense"], rank=2)
    randomise_lora(model)
    host = model.bert.encoder.layer[0].attention.output.dense
    assert isinstance(host, LoRALinear) and len(host._forward_hooks) == 1
    assert len(host.base_layer._forward_hooks) == 0
    captured = {}
    host.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    adapter = model.fastft_adapters["bert__encoder__layer__0__attention__output__dense"]
    inputs = {}
    host.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    logits(model, make_batch("bert"))
    expected = adapter(lora_linear(inputs["x"], host.weight, host.bias, host.lora_a, host.lora_b, host.scaling))
    close(captured["out"], expected)
    assert {"lora", "adapter"} <= {g for g, n in fp.trainable_parameters_report(model).by_group.items() if n}


# --------------------------------------------------------------------------- prefix / prompt


def tiny_roberta():
    config = roberta_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            max_position_embeddings=64, dropout=0.0, num_labels=3, pad_token_id=0,
                            initializer_range=0.2)
    return transformers.RobertaForSequenceClassification(config)


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama"])
def test_prefix_wiring_masked_prefix_equals_base(kind):
    """With its prefix masked out, a prefix-tuned model must compute the base model with
    positions shifted by p (the prefix occupies positions 0..p-1 of the cache). This checks
    the cache injection and the extended attention mask (a mask not extended, or a prefix
    ignored by the mask builder, would give a different result)."""
    p = 3
    model = (tiny_roberta() if kind == "roberta" else MODELS[kind]()).eval()
    batch = make_batch("bert" if kind == "roberta" else kind)
    length = batch["input_ids"].shape[1]
    # RoBERTa numbers positions from padding_idx + 1 (= 1 here); the others from 0.
    first = p + 1 if kind == "roberta" else p
    shifted = torch.arange(first, first + length).expand(4, length)
    base_out = logits(model, {**batch, "position_ids": shifted})
    fp.apply(model, "prefix", num_virtual_tokens=p, prefix_projection=False)
    with_prefix = logits(model, batch)
    assert with_prefix.shape == base_out.shape
    assert not torch.allclose(with_prefix, base_out, atol=1e-3)  # the prefix is attended to
    from fastft.peft import virtual_tokens

    fp.state.peft_state(model).virtual_token_hook.remove()

    def masked_prefix_hook(module, args, kwargs):
        args, kwargs = virtual_tokens._prefix_hook(module, args, kwargs)
        assert kwargs["attention_mask"].shape == (4, p + length)
        kwargs["attention_mask"][:, :p] = 0
        return args, kwargs

    model.register_forward_pre_hook(masked_prefix_hook, with_kwargs=True)
    masked = logits(model, batch)
    if masked.dim() == 3:  # token-level outputs: compare the real (unpadded) tokens
        keep = batch["attention_mask"].bool()
        masked, base_out = masked[keep], base_out[keep]
    close(masked, base_out)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_prefix_materialize_keeps_outputs(kind):
    model = MODELS[kind]().eval()
    fp.apply(model, "prefix", num_virtual_tokens=3, projection_hidden_size=16)
    batch = make_batch(kind)
    before = logits(model, batch)
    report_before = fp.trainable_parameters_report(model)
    fp.materialize_prefix(model)
    close(logits(model, batch), before)
    report_after = fp.trainable_parameters_report(model)
    assert report_after.by_group["prefix"] == 3 * 2 * 2 * 32  # p · L · 2 · h_kv · d_h
    assert report_after.by_group["prefix"] < report_before.by_group["prefix"]
    assert model.fastft_prefix.prefixes.requires_grad


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_prompt_prepends_virtual_tokens(kind):
    model = MODELS[kind]().eval()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    fp.apply(model, "prompt", num_virtual_tokens=3, init_token_ids=[5, 6, 7])
    torch.testing.assert_close(model.fastft_prompt.prompt.detach(), embeddings[[5, 6, 7]])
    batch = make_batch(kind)
    out = model(**batch)
    assert model(batch["input_ids"]).logits.shape == out.logits.shape  # positional calls work too
    if kind == "gpt2":
        assert out.logits.shape == (4, 3 + 7, VOCAB)  # token-level outputs cover the virtual tokens
        # Same as feeding the prompt tokens' embeddings by hand with -100 labels for them.
        fp.state.peft_state(model).virtual_token_hook.remove()
        ids = torch.cat([torch.tensor([[5, 6, 7]]).expand(4, 3), batch["input_ids"]], dim=1)
        mask = torch.cat([torch.ones(4, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
        labels = torch.cat([torch.full((4, 3), -100), batch["labels"]], dim=1)
        by_hand = model(input_ids=ids, attention_mask=mask, labels=labels)
        close(out.logits, by_hand.logits)
        close(out.loss, by_hand.loss)
    else:
        assert out.logits.shape == (4, 3)


def test_prompt_init_from_text_with_tokenizer():
    model = tiny_gpt2()

    class Tokenizer:  # what apply() uses of a transformers tokenizer
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    fp.apply(model, "prompt", num_virtual_tokens=5, init_text="ab", tokenizer=Tokenizer())
    expected = model.get_input_embeddings().weight[[ord(c) % VOCAB for c in "ababa"]]
    torch.testing.assert_close(model.fastft_prompt.prompt.detach(), expected.detach())


# --------------------------------------------------------------------------- PEFT interop


def peft_config_for(kind, **extra):
    import peft

    target = {"bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "down_proj"]}
    task = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}[kind]
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=target[kind], task_type=task,
                           init_lora_weights=False, **extra)


@pytest.mark.parametrize("kind", MODELS)
def test_fastft_save_loads_in_peft(kind, tmp_path):
    import peft

    base = MODELS[kind]().eval()
    model = copy.deepcopy(base)
    target = {"bert": ["query", "value"], "gpt2": "all-linear", "llama": ["q_proj", "v_proj", "down_proj"]}[kind]
    fp.apply(model, "lora", target_modules=target, rank=4, alpha=8, rslora=(kind == "llama"))
    randomise_lora(model)
    if kind == "bert":
        with torch.no_grad():
            model.classifier.weight.normal_()  # a trained head must travel with the adapter
    # Different rank on one layer: written as PEFT's rank_pattern.
    if kind == "gpt2":
        parent = model.transformer.h[1].attn  # transformer.h.1.attn.c_attn
        parent.c_attn = LoRALinear(parent.c_attn.base_layer, rank=2, alpha=8)
        fp.state.refreeze(model)
        with torch.no_grad():
            parent.c_attn.lora_b.normal_()
    fp.save_adapter(model, tmp_path)
    batch = make_batch(kind)
    expected = logits(model, batch)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    close(logits(loaded, batch), expected)
    if kind == "gpt2":
        assert loaded.base_model.model.transformer.h[1].attn.c_attn.r["default"] == 2


@pytest.mark.parametrize("kind", MODELS)
def test_peft_save_loads_in_fastft(kind, tmp_path):
    import peft

    base = MODELS[kind]().eval()
    fresh = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft_config_for(kind, use_rslora=(kind == "llama"))).eval()
    if kind == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path)
    batch = make_batch(kind)
    expected = logits(peft_model, batch)
    fp.load_adapter(fresh, tmp_path)
    assert len(fp.lora_layers(fresh)) == {"bert": 8, "gpt2": 6, "llama": 4}[kind]
    close(logits(fresh.eval(), batch), expected)
    trainable = adapter_parameter_names(fresh)
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)
    # Loading again into the now-adapted model reuses its layers.
    fp.load_adapter(fresh, tmp_path)
    close(logits(fresh, batch), expected)


@pytest.mark.parametrize("kind", MODELS)
def test_accelerate_peft_model_same_outputs(kind):
    import peft

    peft_model = peft.get_peft_model(MODELS[kind](), peft_config_for(kind)).eval()
    batch = make_batch(kind)
    before = peft_model(**batch)
    before.loss.backward()
    grads_before = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    assert fp.accelerate(peft_model) is peft_model
    with mock.patch("fastft.peft.interop.lora_linear", wraps=lora_linear) as fused:
        after = peft_model(**batch)
    assert fused.call_count == {"bert": 8, "gpt2": 6, "llama": 4}[kind]  # every LoRA layer went fused
    close(after.logits, before.logits)
    after.loss.backward()
    for name, grad in grads_before.items():
        close(dict(peft_model.named_parameters())[name].grad, grad, 1e-4)
    with peft_model.disable_adapter():  # PEFT features still work: falls back to PEFT's path
        with mock.patch("fastft.peft.interop.lora_linear", wraps=lora_linear) as fused:
            peft_model(**batch)
        assert fused.call_count == 0


# --------------------------------------------------------------------------- errors


def test_bad_input_errors(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="unknown method 'loraa'"):
        fp.apply(model, "loraa")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fp.apply(model, "lora", rank=0)
    with pytest.raises(ValueError, match=r"matches no linear module.*attention\.self\.query"):
        fp.apply(model, "lora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="matches no linear module"):
        fp.apply(model, "lora", target_modules=r"nothing\..*")
    with pytest.raises(TypeError, match="unexpected option.*bottleneck_size"):
        fp.apply(model, "lora", bottleneck_size=3)
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        fp.apply(model, "lora", modules_to_save=["head"])
    assert not fp.lora_layers(model)  # failed calls changed nothing
    with pytest.raises(ValueError, match="no fastft LoRA layers"):
        fp.merge(model)
    with pytest.raises(ValueError, match="no fastft LoRA layers"):
        fp.save_adapter(model, tmp_path / "none")

    fp.apply(model, "lora", target_modules=["query"], rank=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        fp.apply(model, "lora", target_modules=["query"], rank=4)
    fp.save_adapter(model, tmp_path / "rank4")
    # Shape mismatch: same modules, different rank.
    other = tiny_bert()
    fp.apply(other, "lora", target_modules=["query"], rank=8)
    with pytest.raises(ValueError, match=r"shape mismatch for base_model\.model\.bert\.encoder\.layer\.\d\.attention"
                                         r"\.self\.query\.lora_A\.weight.*\(8, 32\).*\(4, 32\)"):
        fp.load_adapter(other, tmp_path / "rank4")
    other_alpha = tiny_bert()
    fp.apply(other_alpha, "lora", target_modules=["query"], rank=4, alpha=3)
    with pytest.raises(ValueError, match=r"alpha=3, use_rslora=False; the file's config says alpha=16"):
        fp.load_adapter(other_alpha, tmp_path / "rank4")
    # Same architecture, other width: refused before anything is changed.
    wider = transformers.BertForSequenceClassification(bert_config(
        VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, dropout=0.1, num_labels=3))
    with pytest.raises(ValueError, match=r"shape mismatch for .*layer\.0\.attention\.self\.query\.lora_A\.weight.*"
                                         r"expects \(4, 48\), the file has \(4, 32\)"):
        fp.load_adapter(wider, tmp_path / "rank4")
    assert not fp.lora_layers(wider)
    # An adapter for another model: names the first module it cannot find.
    with pytest.raises(ValueError, match=r"does not fit GPT2LMHeadModel.*bert\.encoder\.layer\.0\.attention\.self\.query"):
        fp.load_adapter(tiny_gpt2(), tmp_path / "rank4")
    # A model with LoRA elsewhere.
    elsewhere = tiny_bert()
    fp.apply(elsewhere, "lora", target_modules=["value"], rank=4)
    with pytest.raises(ValueError, match="does not fit BertForSequenceClassification"):
        fp.load_adapter(elsewhere, tmp_path / "rank4")
    with pytest.raises(FileNotFoundError):
        fp.load_adapter(tiny_bert(), tmp_path / "missing")

    with pytest.raises(NotImplementedError, match="DistilBertForSequenceClassification.*'distilbert'"):
        distil = transformers.DistilBertForSequenceClassification(distilbert_config(
            VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64, dropout=0.1))
        fp.apply(distil, "prefix", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fp.apply(tiny_gpt2(), "prompt", num_virtual_tokens=0)
    prompted = fp.apply(tiny_gpt2(), "prompt", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="cannot be combined"):
        fp.apply(prompted, "prefix", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="cannot find the attention output"):
        fp.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "adapter")


# --------------------------------------------------------------------------- structure


def peft_import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for the files of fastft.peft, read with ``ast``:
    every import statement counts, at module level or inside a function (an import put
    into a function to dodge a cycle is still a cycle). A name imported from a package
    counts as its submodule when there is one by that name, else as the package."""
    modules = {("fastft.peft" if path.stem == "__init__" else f"fastft.peft.{path.stem}"): path
               for path in package_dir.glob("*.py")}
    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                parent = "fastft.peft".rsplit(".", node.level - 1)[0] if node.level else ""  # `from .x` / `from ..x`
                base = ".".join(part for part in (parent, node.module) if part)
                imported.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                                for alias in node.names)
        graph[module] = imported
    return graph


def test_peft_imports_form_no_cycle_and_stay_below_train():
    graph = peft_import_graph(pathlib.Path(fp.__file__).parent)
    assert {"fastft.peft.inject", "fastft.peft.io", "fastft.peft.virtual_tokens"} <= set(graph)
    for module, imported in graph.items():
        # fastft.peft sits above fastft.nn / fastft.ops and below everything else of fastft.
        upward = sorted(name for name in imported if name.startswith("fastft.")
                        and not name.startswith(("fastft.peft", "fastft.nn", "fastft.ops")))
        assert not upward, f"{module} imports {upward}, above fastft.peft"
    internal = {module: {name for name in imported if name in graph and name != module}
                for module, imported in graph.items()}
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            cycle = on_path[on_path.index(module):] + [module]
            raise AssertionError("import cycle in fastft.peft: " + " -> ".join(cycle))
        if module in done:
            return
        on_path.append(module)
        for name in sorted(internal[module]):
            visit(name)
        on_path.pop()
        done.add(module)

    for module in sorted(internal):
        visit(module)
