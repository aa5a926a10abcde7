"""Learning from preferences: fastft/alignment/ (data, fused log-probs, losses, references,
online RL), the reward-model task (fastft/finetuning/tasks/reward.py) and the recipe
(fastft/recipes/align.py).

Every loss is checked against a plain-torch implementation written here from the full
``(tokens, vocab)`` logits -- values and the gradient of every parameter -- on random tiny
GPT-2 and Llama models (DESIGN.md's tolerance rule: fp64 reference, fp32 plain). The
learning tests use a tiny GPT-2 pretrained here on the toy grammar (fastft.data.toy_corpus)
and preferences a rule generates from that grammar. ``fused=False``: the CPU loop
(fastft.patch is tested in test_models.py); the log-probs still come from the fused loss op.
"""

import copy
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastft.alignment import (
    DPO,
    GRPO,
    IPO,
    ORPO,
    RLOO,
    AdaptersDisabled,
    CachedReference,
    FrozenCopy,
    Method,
    PairCollator,
    PolicyGradientObjective,
    PreferenceObjective,
    SimPO,
    adapters_disabled,
    cache_reference_logps,
    sequence_logprobs,
    tokenize_pairs,
)
from fastft.alignment.data import response_batch
from fastft.alignment.logprobs import full_logits_sequence_logprobs, logprob_path
from fastft.alignment.online import check_rewards
from fastft.data import toy_corpus
from fastft.finetuning import LoRA, load_finetuned, predict
from fastft.finetuning.tasks.reward import BradleyTerryObjective, RewardTask
from fastft.recipes.align import AlignConfig, align
from fastft.recipes.finetune import finetune

from _tiny_models import bert_config, gpt2_config, llama_config  # tests/_tiny_models.py
from _tolerance import assert_tolerance_rule  # tests/_tolerance.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOKENIZERS = os.path.join(os.path.dirname(__file__), "data")
FAST = dict(progress=False, plot=False, fused=False, save_every=0, log_every=1000)
ANIMALS = ["fox", "dog", "cat", "bird", "elephant"]
OTHERS = ["mountaineer", "scientist", "river"]
ADJECTIVES = ["quick", "sleepy", "red", "tiny", "careful"]
BIG = ["enormous", "extraordinary", "unbelievable"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "toy_gpt_tokenizer"))


def tiny_config(tokenizer, family=gpt2_config, **extra):
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return family(len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=128, **{**ids, **extra})


@pytest.fixture(scope="module")
def base_lm(tokenizer, tmp_path_factory):
    """A tiny GPT-2 causal LM pretrained 150 plain steps on toy-grammar documents (each
    ending with eos), saved with its tokenizer: the path."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_config(tokenizer))
    documents = [[tokenizer.bos_token_id] + tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
                 for t in toy_corpus(400, seed=3, max_sentences=2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        chunk = documents[(16 * step) % len(documents):][:16]
        batch = response_batch([[]] * len(chunk), chunk, tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = str(tmp_path_factory.mktemp("base") / "lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def phrase(rng, nouns, adjectives=ADJECTIVES):
    return f"{rng.choice(['the', 'a', 'every', 'one'])} {rng.choice(adjectives)} {rng.choice(nouns)} ."


def animal_pairs(n, seed):
    """Prompt: a toy sentence; chosen: a phrase about an animal, rejected: about a person or
    a river (the rule DPO has to learn)."""
    rng = random.Random(seed)
    return [{"prompt": f"{s} so :", "chosen": phrase(rng, ANIMALS), "rejected": phrase(rng, OTHERS)}
            for s in toy_corpus(n, seed=seed, max_sentences=1)]


# ------------------------------------------------------------------------ data


def test_truncation_keeps_the_prompt_end_and_the_response_start_and_reports_drops(tokenizer):
    prompt = "the quick fox chases a sleepy dog . every red cat sees one tiny bird so :"
    rows = [
        {"prompt": prompt, "chosen": "the quick fox chases a dog .", "rejected": "a red river ."},
        {"prompt": "one cat", "chosen": "a dog .", "rejected": "a dog ."},  # identical: dropped
        {"prompt": "one cat", "chosen": "", "rejected": "a dog ."},  # empty: dropped
        {"prompt": "one cat", "chosen": "a dog .", "rejected": "a red bird ."},
    ]
    with pytest.warns(UserWarning, match="2 dropped|dropped"):
        prepared = tokenize_pairs(rows, tokenizer, max_length=12, max_prompt_length=6)
    report = prepared.report
    assert (report.total, report.kept, report.identical, report.empty, report.truncated) == (4, 2, [1], [2], [0])
    first = prepared.features[0]
    full_prompt = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_chosen = tokenizer("the quick fox chases a dog .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first["input_ids"] == full_prompt[-6:]  # the prompt's end
    assert first["chosen_ids"] == full_chosen[:6]  # the response's start
    assert len(first["input_ids"]) + len(first["chosen_ids"]) == 12
    batch = PairCollator(tokenizer)(prepared.features)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert (batch["labels"][0, :6] == -100).all() and batch["labels"][0, 6:].tolist() == first["chosen_ids"]
    with pytest.raises(ValueError, match="row 1 lacks \\['chosen'\\]"):
        tokenize_pairs([rows[0], {"prompt": "x", "rejected": "y"}], tokenizer)


def test_typed_methods_parse_and_refuse_bad_values():
    assert Method.parse("dpo") == DPO(beta=0.1)
    assert Method.parse({"name": "grpo", "k": 8}) == GRPO(k=8)
    from fastft.train.config import apply_overrides, config_from_dict

    assert config_from_dict(AlignConfig, {"method": "ipo"}).method == IPO()
    assert apply_overrides(config_from_dict(AlignConfig, {"method": "simpo"}), ["method.beta=2.5"]).method == SimPO(beta=2.5)
    for bad in ({"name": "dpo", "beta": 0}, {"name": "ipo", "beta": -1.0}, {"name": "rloo", "k": 1},
                {"name": "grpo", "k": 1}, {"name": "dpo", "label_smoothing": 0.6}):
        with pytest.raises(ValueError):
            Method.parse(bad)
    with pytest.raises(TypeError, match="unexpected option"):
        Method.parse({"name": "simpo", "k": 4})


# ------------------------------------------------------------------------ losses vs full logits


def _plain_sequence_logps(model, batch):
    """log π(y | x) from the full logits, written out: log_softmax, gather, mask, sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = torch.gather(logps, 2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1), mask.sum(-1)


def _plain_pair_loss(method, model, batch):
    """Each method's loss summed over the pairs (and ORPO's NLL), from the formulas."""
    logps, lengths = _plain_sequence_logps(model, batch)
    b = logps.shape[0] // 2
    c, r = logps[:b], logps[b:]
    ref = batch.get("ref_logps")
    if isinstance(method, DPO):
        z = method.beta * ((c - ref[:b]) - (r - ref[b:]))
        eps = method.label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).sum()
    avg_c, avg_r = c / lengths[:b], r / lengths[b:]
    if isinstance(method, IPO):
        h = (avg_c - ref[:b] / lengths[:b]) - (avg_r - ref[b:] / lengths[b:])
        return ((h - 1 / (2 * method.beta)) ** 2).sum()
    if isinstance(method, SimPO):
        return -F.logsigmoid(method.beta * (avg_c - avg_r) - method.gamma).sum()
    if isinstance(method, ORPO):
        log_odds = (avg_c - torch.log1p(-torch.exp(avg_c))) - (avg_r - torch.log1p(-torch.exp(avg_r)))
        return -c.sum() / lengths[:b].sum() - method.beta * F.logsigmoid(log_odds).sum() / b
    raise AssertionError(method)


def _random_pairs(tokenizer, n, seed):
    rng = random.Random(seed)
    words = ANIMALS + OTHERS + ADJECTIVES
    return [{"prompt": " ".join(rng.choices(words, k=rng.randint(1, 9))),
             "chosen": " ".join(rng.choices(words, k=rng.randint(1, 7))),
             "rejected": " ".join(rng.choices(words, k=rng.randint(1, 7)))} for _ in range(n)]


@pytest.mark.parametrize("family", [gpt2_config, llama_config], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", [DPO(beta=0.3), DPO(beta=0.1, label_smoothing=0.2), IPO(beta=0.5),
                                    SimPO(beta=2.0, gamma=0.5), ORPO(beta=0.2)], ids=["dpo", "cdpo", "ipo", "simpo", "orpo"])
def test_preference_losses_match_full_logits(tokenizer, family, method):
    torch.manual_seed(7)
    model = (transformers.GPT2LMHeadModel if family is gpt2_config else transformers.LlamaForCausalLM)(
        tiny_config(tokenizer, family, initializer_range=0.2))
    assert logprob_path(model) == ("fused", None)
    features = tokenize_pairs(_random_pairs(tokenizer, 7, seed=3), tokenizer, max_length=24).features
    batch = PairCollator(tokenizer)(features)
    batch["ref_logps"] = -20 * torch.rand(batch["input_ids"].shape[0])  # a reference other than the policy
    objective = PreferenceObjective(method, CachedReference())
    counts = objective.counts(batch)

    def run(m, dtype, fast):
        b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        m.zero_grad()
        if fast:
            sums, _ = objective.loss(m, b, counts)
            loss = sum(s / counts[t] for t, s in sums.items())
        else:
            loss = _plain_pair_loss(method, m, b) / (1 if isinstance(method, ORPO) else counts["pref"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    fast_loss, fast_grads = run(model, torch.float32, True)
    plain_loss, plain_grads = run(model, torch.float32, False)
    reference = copy.deepcopy(model).double()
    ref_loss, ref_grads = run(reference, torch.float64, False)
    assert_tolerance_rule("loss", fast_loss, ref_loss, plain_loss, atol=1e-6, relative_atol=True)
    assert set(fast_grads) == set(ref_grads) == {n for n, _ in model.named_parameters()}
    for name in ref_grads:
        assert_tolerance_rule(f"grad {name}", fast_grads[name], ref_grads[name], plain_grads[name], atol=1e-6,
                              relative_atol=True)


def test_policy_gradient_loss_matches_full_logits(tokenizer):
    torch.manual_seed(11)
    model = transformers.GPT2LMHeadModel(tiny_config(tokenizer, initializer_range=0.2))
    features = tokenize_pairs(_random_pairs(tokenizer, 6, seed=4), tokenizer, max_length=24).features
    batch = response_batch([f["input_ids"] for f in features], [f["chosen_ids"] for f in features],
                           tokenizer.pad_token_id)
    tokens = batch["input_ids"].shape[1] - 1
    batch["old_logps"] = -3 * torch.rand(6, tokens)
    batch["ref_logps"] = -3 * torch.rand(6, tokens)
    batch["advantages"] = torch.randn(6)
    for method in (GRPO(k=2, beta=0.1, clip=0.2), RLOO(k=2, clip=0.3)):
        objective = PolicyGradientObjective(method)
        counts = objective.counts(batch)

        def plain(m, b):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            targets = b["labels"][:, 1:]
            mask = targets != -100
            logps = torch.gather(torch.log_softmax(logits, -1), 2, targets.clamp(min=0)[..., None])[..., 0]
            ratio = torch.exp(logps - b["old_logps"])
            adv = b["advantages"][:, None]
            loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - method.clip, 1 + method.clip) * adv)
            if isinstance(method, GRPO):
                loss = loss + method.beta * (torch.exp(b["ref_logps"] - logps) - (b["ref_logps"] - logps) - 1)
            return (loss * mask).sum() / mask.sum()

        def run(m, dtype, fast):
            b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
            m.zero_grad()
            loss = objective.loss(m, b, counts)[0]["pg"] / counts["pg"] if fast else plain(m, b)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

        fast_loss, fast_grads = run(model, torch.float32, True)
        plain_loss, plain_grads = run(model, torch.float32, False)
        ref_loss, ref_grads = run(copy.deepcopy(model).double(), torch.float64, False)
        assert_tolerance_rule(f"{method.name} loss", fast_loss, ref_loss, plain_loss, atol=1e-6, relative_atol=True)
        for name in ref_grads:
            assert_tolerance_rule(f"{method.name} grad {name}", fast_grads[name], ref_grads[name], plain_grads[name],
                                  atol=1e-6, relative_atol=True)


def test_bradley_terry_matches_one_sequence_at_a_time(tokenizer):
    """The reward objective on a padded 2B batch equals scoring each unpadded sequence alone."""
    torch.manual_seed(5)
    model = transformers.GPT2ForSequenceClassification(tiny_config(tokenizer, num_labels=1, initializer_range=0.2))
    features = tokenize_pairs(_random_pairs(tokenizer, 5, seed=6), tokenizer, max_length=24).features
    for i, f in enumerate(features):
        f["margin"] = 0.25 * i
    batch = PairCollator(tokenizer)(features)
    objective = BradleyTerryObjective()
    sums, _ = objective.loss(model, batch, objective.counts(batch))
    sums["bt"].backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def score(ids):
        return model(input_ids=torch.tensor([ids])).logits[0, 0]

    plain = sum(-F.logsigmoid(score(f["input_ids"] + f["chosen_ids"]) - score(f["input_ids"] + f["rejected_ids"])
                              - f["margin"]) for f in features)
    plain.backward()
    torch.testing.assert_close(sums["bt"], plain, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chat_messages_go_through_the_chat_template(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": "a dog"}], "chosen": [{"role": "assistant", "content": "a cat ."}],
             "rejected": [{"role": "assistant", "content": "a river ."}]}]
    (feature,) = tokenize_pairs(rows, chat, max_length=64).features
    prompt_text = chat.decode(feature["input_ids"])
    assert prompt_text.startswith("user") and "dog" in prompt_text
    assert "cat" in chat.decode(feature["chosen_ids"]) and "river" not in chat.decode(feature["chosen_ids"])


# ------------------------------------------------------------------------ references


def test_lora_reference_with_adapters_disabled_equals_a_frozen_copy(base_lm, tokenizer, tmp_path):
    """LoRA + DPO: the reference from the same model with LoRA switched off gives the same
    losses and weights as an explicit frozen copy of the starting model."""
    data = {"train": animal_pairs(32, 1), "validation": animal_pairs(8, 2)}
    runs = {}
    for reference in ("adapters", "copy"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel.from_pretrained(base_lm)
        result = align(model, tokenizer, data, method=DPO(beta=0.5), strategy=LoRA(rank=4), reference=reference,
                       output_dir=str(tmp_path / reference), max_steps=4, batch_size=8, lr=1e-2, eval_every=2,
                       save=False, kl_prompts=4, **FAST)
        runs[reference] = result
    losses = {k: [h["loss"] for h in r.history] for k, r in runs.items()}
    assert len(losses["adapters"]) == 2 and losses["adapters"][0] != pytest.approx(math.log(2))  # it trained
    assert losses["adapters"] == pytest.approx(losses["copy"], rel=1e-5, abs=1e-6)
    weights = {k: dict(r.model.named_parameters()) for k, r in runs.items()}
    for name, param in weights["adapters"].items():
        torch.testing.assert_close(param, weights["copy"][name], rtol=1e-5, atol=1e-6, msg=name)
    # and the context manager leaves the adapters on afterwards
    model = runs["adapters"].model
    batch = PairCollator(tokenizer)(tokenize_pairs(data["validation"], tokenizer).features)
    on = sequence_logprobs(model, batch)[0]
    with adapters_disabled(model):
        off = sequence_logprobs(model, batch)[0]
    torch.testing.assert_close(sequence_logprobs(model, batch)[0], on)
    torch.testing.assert_close(off, AdaptersDisabled().logps(model, batch))
    assert not torch.allclose(on, off)


def test_cached_reference_is_the_starting_model(base_lm, tokenizer):
    model = transformers.GPT2LMHeadModel.from_pretrained(base_lm)
    features = tokenize_pairs(animal_pairs(5, 3), tokenizer).features
    collator = PairCollator(tokenizer)
    cache_reference_logps(model, features, collator, batch_size=2)
    batch = collator(features)
    expected = full_logits_sequence_logprobs(model, batch)
    torch.testing.assert_close(CachedReference().logps(model, batch), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(FrozenCopy(model).logps(model, batch), expected.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ learning


def test_dpo_raises_held_out_reward_accuracy_and_margin(base_lm, tokenizer, tmp_path):
    texts = toy_corpus(60, seed=9)
    result = align(base_lm, base_lm, {"train": animal_pairs(128, 4), "validation": animal_pairs(32, 5)},
                   method="dpo", output_dir=str(tmp_path), epochs=2, batch_size=16, lr=3e-3, kl_prompts=8,
                   pretraining_data={"validation": texts[:20]}, **FAST)
    before, after = result.metrics_before, result.metrics
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # policy == reference: all ties
    assert after["reward_accuracy"] > 0.8
    assert after["reward_margin"] > 0.5
    assert after["chosen_logps"] - after["rejected_logps"] > before["chosen_logps"] - before["rejected_logps"]
    assert after["loss"] < before["loss"]
    assert 0 < after["kl_ref"] < 20 and abs(before["kl_ref"]) < 1e-4
    assert [h["kl_ref"] for h in result.history] and all(h["kl_ref"] is not None for h in result.history)
    assert result.forgetting["perplexity_before"] > 1 and "increase" in result.forgetting
    assert result.data["train"].kept == 128
    # the bundle answers prompts as an SFT model does
    (answer,) = predict(result.save_path, [animal_pairs(1, 6)[0]["prompt"]])
    assert isinstance(answer, str)


@pytest.mark.parametrize("method", ["ipo", "simpo", "orpo"])
def test_other_offline_methods_learn_the_preference(base_lm, tokenizer, tmp_path, method):
    result = align(base_lm, tokenizer, {"train": animal_pairs(64, 4), "validation": animal_pairs(24, 5)},
                   method=method, output_dir=str(tmp_path), epochs=2, batch_size=16, lr=3e-3, kl_prompts=4,
                   save=False, **FAST)
    assert result.metrics["chosen_logps"] - result.metrics["rejected_logps"] > (
        result.metrics_before["chosen_logps"] - result.metrics_before["rejected_logps"] + 0.5)
    assert result.metrics["reward_accuracy"] > 0.8


def big_pairs(n, seed):
    """Rule: a response with a big adjective (enormous, extraordinary, unbelievable) is
    preferred to one without; nouns at random."""
    rng = random.Random(seed)
    return [{"prompt": f"{s} so :", "chosen": phrase(rng, ANIMALS + OTHERS, BIG),
             "rejected": phrase(rng, ANIMALS + OTHERS, ADJECTIVES)} for s in toy_corpus(n, seed=seed, max_sentences=1)]


def test_reward_model_learns_a_rule_and_scores_text_from_its_bundle(base_lm, tokenizer, tmp_path):
    model = transformers.GPT2ForSequenceClassification.from_pretrained(base_lm, num_labels=1)
    data = {"train": big_pairs(160, 7), "validation": big_pairs(40, 8)}
    result = finetune(model, tokenizer, data, task="reward", output_dir=str(tmp_path), epochs=3, batch_size=16, lr=3e-3,
                      **FAST)
    assert result.metrics["validation"]["reward_accuracy"] > 0.8
    good, bad = "the dog sees a cat so : every enormous river .", "the dog sees a cat so : every sleepy river ."
    scores = predict(result.save_path, [good, bad, {"prompt": "the dog sees a cat so :", "response": "one enormous fox ."}])
    assert scores[0] > scores[1] and scores[2] > scores[1]
    reloaded, _, task = load_finetuned(result.save_path)
    assert isinstance(task, RewardTask) and reloaded.config.num_labels == 1
    with pytest.raises(ValueError, match="pad_token_id"):
        bare = transformers.GPT2ForSequenceClassification(tiny_config(tokenizer, num_labels=1, pad_token_id=None))
        finetune(bare, tokenizer, data, task="reward", output_dir=str(tmp_path / "bare"), **FAST)


def dog_reward(prompts, completions):
    """Rule-based reward: 1 for each "dog" in the completion (at most 2)."""
    return [min(2, c.split().count("dog")) for c in completions]


@pytest.mark.parametrize("method", [GRPO(k=4, beta=0.1, max_new_tokens=8), RLOO(k=4, beta=0.1, max_new_tokens=8)],
                         ids=["grpo", "rloo"])
def test_online_rl_raises_the_mean_reward_with_bounded_kl(base_lm, tokenizer, tmp_path, method):
    prompts = [f"{s.rsplit(' ', 4)[0]}" for s in toy_corpus(64, seed=12, max_sentences=1)]
    result = align(base_lm, tokenizer, {"train": prompts, "validation": prompts[:32]}, method=method,
                   reward=dog_reward, output_dir=str(tmp_path), max_steps=25, batch_size=8, lr=3e-3, save=False, **FAST)
    history = result.history
    assert len(history) == 25 and {"reward", "kl", "response_length", "loss"} <= set(history[0])
    first, last = (sum(h["reward"] for h in part) / len(part) for part in (history[:5], history[-5:]))
    assert last > first + 0.3, (first, last)
    assert result.metrics["reward"] > result.metrics_before["reward"]
    assert max(h["kl"] for h in history) < 15.0  # nats per 8-token completion (lr 1e-2 with beta 0.02 reached 31-47)
    assert 0 <= result.metrics_before["kl"] < 0.05  # the policy starts as its reference (LoRA off / copy)


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_the_first_step(base_lm, tokenizer, tmp_path):
    out = tmp_path / "run"
    run = dict(output_dir=str(out), max_steps=2, batch_size=4, **FAST)
    pairs = animal_pairs(8, 1)
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        align(base_lm, tokenizer, pairs + [{"prompt": "a", "chosen": "b"}], **run)
    with pytest.raises(ValueError, match="no pair left"), pytest.warns(UserWarning, match="identical"):
        align(base_lm, tokenizer, [{"prompt": "a", "chosen": "one dog .", "rejected": "one dog ."}], **run)
    bert = transformers.BertForMaskedLM(bert_config(len(tokenizer)))
    with pytest.raises(ValueError, match="causal language model"):
        align(bert, tokenizer, pairs, **run)
    with pytest.raises(ValueError, match="beta must be > 0"):
        align(base_lm, tokenizer, pairs, method={"name": "dpo", "beta": 0.0}, **run)
    with pytest.raises(ValueError, match="k \\(completions per prompt\\)"):
        align(base_lm, tokenizer, pairs, method={"name": "grpo", "k": 1}, reward=dog_reward, **run)
    with pytest.raises(ValueError, match="need a reward"):
        align(base_lm, tokenizer, pairs, method="rloo", **run)
    with pytest.raises(ValueError, match="non-finite"):
        align(base_lm, tokenizer, pairs, method=GRPO(k=2, max_new_tokens=4), reward=lambda p, c: [float("nan")] * len(c),
              **run)
    with pytest.raises(ValueError, match="returned 1 rewards for 8"):
        align(base_lm, tokenizer, pairs, method=RLOO(k=2, max_new_tokens=4), reward=lambda p, c: [1.0], **run)
    with pytest.raises(ValueError, match="reference='adapters' needs strategy='lora'"):
        align(base_lm, tokenizer, pairs, reference="adapters", **run)
    with pytest.raises(ValueError, match="not 'cache'"):
        align(base_lm, tokenizer, pairs, method="grpo", reward=dog_reward, reference="cache", **run)
    assert not out.exists()  # nothing was written by any of them
    with pytest.raises(ValueError, match="wrong|returned 3 rewards for 2"):
        check_rewards([1, 2, 3], 2)
