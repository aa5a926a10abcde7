"""fastft/models/first_token.py: the last layer cut to position 0 gives the same logits
and the same gradients for every parameter, on padded batches, and leaves other users of
the backbone (the masked-LM view) and the model after ``remove()`` untouched."""

import pytest
import torch
import transformers

from fastft.models.first_token import first_token_last_layer

from _tiny_models import bert_config, electra_config, gpt2_config, roberta_config  # tests/_tiny_models.py


def tiny_config(kind, **extra):
    builder = {"bert": bert_config, "roberta": roberta_config, "electra": electra_config}[kind]
    return builder(97, hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=40,
                   max_position_embeddings=64, dropout=0.0, num_labels=3, **extra)


def padded_batch(batch=5, length=13, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    lengths = torch.tensor([length, 1, 7, length - 1, 4][:batch])
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.randint(0, 3, (batch,), generator=generator)}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,model_class", [
    ("bert", transformers.BertForSequenceClassification),
    ("roberta", transformers.RobertaForSequenceClassification),
    ("electra", transformers.ElectraForSequenceClassification),
])
def test_same_logits_and_gradients(kind, model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config(kind)).train()
    batch = padded_batch()
    reference_logits, reference_grads = loss_and_grads(model, batch)
    cut, reason = first_token_last_layer(model)
    assert cut is not None, reason
    try:
        logits, grads = loss_and_grads(model, batch)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    finally:
        cut.remove()
    assert hidden.shape[1] == 1  # the cut really happened
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # removed: the full last layer again
    assert model(**batch, output_hidden_states=True).hidden_states[-1].shape[1] == batch["input_ids"].shape[1]


def test_same_gradients_through_lora():
    import fastft.peft

    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(tiny_config("bert"))
    fastft.peft.apply(model, "lora", target_modules=["query", "value", "dense"], rank=4)
    for name, param in model.named_parameters():  # non-zero B so every LoRA factor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = padded_batch(seed=2)
    reference_logits, reference_grads = loss_and_grads(model, batch)
    cut, reason = first_token_last_layer(model)
    assert cut is not None, reason
    logits, grads = loss_and_grads(model, batch)
    cut.remove()
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-6)
    assert any("lora" in name for name in grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_masked_lm_sharing_the_backbone_sees_the_full_layer():
    torch.manual_seed(3)
    config = tiny_config("bert")
    classifier = transformers.BertForSequenceClassification(config)
    masked_lm = transformers.BertForMaskedLM(config)
    masked_lm.bert = classifier.bert  # what guards.lm_view does
    batch = padded_batch(seed=4)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    expected = masked_lm(**inputs).logits
    cut, _ = first_token_last_layer(classifier)
    classifier(**inputs)  # in and out of the classifier's forward ...
    got = masked_lm(**inputs).logits  # ... the masked-LM view is not cut
    cut.remove()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_models_whose_head_reads_other_positions_are_left_alone():
    config = gpt2_config(97, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         dropout=0.1, num_labels=2)
    cut, reason = first_token_last_layer(transformers.GPT2ForSequenceClassification(config))
    assert cut is None and "not a known first-token classifier" in reason
    cut, reason = first_token_last_layer(transformers.BertForTokenClassification(tiny_config("bert")))
    assert cut is None and "BertForTokenClassification" in reason


def test_finetune_with_and_without_the_cut_trains_the_same_model(tmp_path):
    """End to end through fastft.finetune (no dropout, same seed): the same weights."""
    from fastft.data import toy_corpus, toy_tokenizer
    from fastft.recipes.finetune import finetune

    tokenizer = toy_tokenizer()
    rows = [{"text": s, "label": int("fox" in s)} for s in toy_corpus(48, seed=5, max_sentences=2)]
    results = {}
    for cut in (False, True):
        torch.manual_seed(0)
        config = bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=48, max_position_embeddings=512, dropout=0.0, num_labels=2)
        model = transformers.BertForSequenceClassification(config)
        results[cut] = finetune(model, tokenizer, {"train": rows[:40], "validation": rows[40:]}, strategy="full",
                                cut_last_layer=cut, output_dir=str(tmp_path / str(cut)), epochs=2, batch_size=8,
                                lr=1e-3, save=False, fused=False, progress=False, plot=False, log_every=1000)
    full, cut = (dict(results[c].model.named_parameters()) for c in (False, True))
    for name, value in full.items():
        torch.testing.assert_close(cut[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert results[True].metrics["validation"]["loss"] == pytest.approx(results[False].metrics["validation"]["loss"],
                                                                         rel=1e-4)
    # handed back whole: the last layer runs for every position again
    batch = tokenizer(["a fox ."], return_tensors="pt")
    assert results[True].model(**batch, output_hidden_states=True).hidden_states[-1].shape[1] == batch["input_ids"].shape[1]
