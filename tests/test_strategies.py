"""Fine-tuning strategies: layer groups, freezing, gradual unfreezing, per-layer learning
rates (fastft/finetuning/strategies.py) and the slanted triangular schedule
(fastft/train/schedules.py)."""

from types import SimpleNamespace

import pytest
import torch
import transformers

from fastft.finetuning.strategies import (
    Adapter,
    Discriminative,
    Features,
    Freeze,
    Full,
    GradualUnfreeze,
    GradualUnfreezing,
    LayerwiseDecay,
    LoRA,
    LRScheme,
    Prefix,
    Prompt,
    Strategy,
    layer_groups,
    lr_param_groups,
)
from fastft.train.schedules import SCHEDULES, build_scheduler, slanted_triangular

from _tiny_models import bert_config  # tests/_tiny_models.py

NUM_LAYERS = 3


def tiny_bert(num_labels=2):
    config = bert_config(97, hidden_size=16, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=32, dropout=0.1, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config)


# ------------------------------------------------------------------------ schedule


def test_slanted_triangular_matches_ulmfit_equation():
    total, cut_frac, ratio = 200, 0.1, 32
    cut = 20
    assert slanted_triangular(0, total_steps=total) == pytest.approx(1 / ratio)
    assert slanted_triangular(10, total_steps=total) == pytest.approx((1 + 0.5 * 31) / 32)  # half-way up
    assert slanted_triangular(cut, total_steps=total) == pytest.approx(1.0)  # the peak at cut
    # decay: p = 1 - (t - cut) / (cut * (1/cut_frac - 1)) = 1 - 90/180 at t = 110
    assert slanted_triangular(110, total_steps=total) == pytest.approx((1 + 0.5 * 31) / 32)
    assert slanted_triangular(total, total_steps=total) == pytest.approx(1 / ratio)
    values = [slanted_triangular(t, total_steps=total, cut_frac=cut_frac, ratio=ratio) for t in range(total)]
    assert values.index(max(values)) == cut
    assert all(b > a for a, b in zip(values[:cut], values[1:cut + 1]))  # rising
    assert all(b < a for a, b in zip(values[cut:-1], values[cut + 1:]))  # falling


def test_slanted_triangular_is_registered_and_drives_every_group():
    assert SCHEDULES["slanted_triangular"] is slanted_triangular
    w = torch.nn.Parameter(torch.randn(3))
    v = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [v], "lr": 0.1}], lr=1.0)
    scheduler = build_scheduler(optimizer, "slanted_triangular", total_steps=50, cut_frac=0.2, ratio=8)
    lrs = []
    for _ in range(50):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    peak = max(range(50), key=lambda t: lrs[t][0])
    assert peak == 10
    assert lrs[0][0] == pytest.approx(1 / 8) and lrs[0][1] == pytest.approx(0.1 / 8)
    assert all(a[1] == pytest.approx(0.1 * a[0]) for a in lrs)  # each group keeps its own peak


def test_slanted_triangular_rejects_bad_options():
    with pytest.raises(ValueError, match="cut_frac"):
        slanted_triangular(0, total_steps=10, cut_frac=1.5)
    with pytest.raises(ValueError, match="ratio"):
        slanted_triangular(0, total_steps=10, ratio=0.5)


# ------------------------------------------------------------------------ groups and rates


def test_layer_groups_cover_every_parameter_once_in_depth_order():
    model = tiny_bert()
    groups = layer_groups(model)
    assert groups.names == ["embeddings", "layer.0", "layer.1", "layer.2", "head"]
    listed = [n for g in groups.names for n in groups.params[g]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert len(listed) == len(set(listed))
    assert all(n.startswith("bert.embeddings.") for n in groups.params["embeddings"])
    assert all(n.startswith("bert.encoder.layer.1.") for n in groups.params["layer.1"])
    assert groups.params["head"] == ["classifier.weight", "classifier.bias"]
    assert "bert.pooler.dense.weight" in groups.params["layer.2"]  # after the last layer: the top group


@pytest.mark.parametrize("scheme,factor,expected", [
    ("discriminative", None, lambda lr, d: lr / 2.6 ** d),
    ("discriminative", 2.0, lambda lr, d: lr / 2.0 ** d),
    ("layerwise", None, lambda lr, d: lr * 0.8 ** d),
    ("layerwise", 0.5, lambda lr, d: lr * 0.5 ** d),
])
def test_per_layer_rates_land_on_the_right_parameters(scheme, factor, expected):
    model = tiny_bert()
    lr = 3e-3
    # a name takes the scheme's default factor; the factor travels in the scheme object
    scheme = scheme if factor is None else LRScheme.parse({"name": scheme, "factor": factor})
    param_groups = lr_param_groups(model, lr, 0.01, scheme)
    rate_of = {id(p): g["lr"] for g in param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in param_groups for p in g["params"]}
    depth_of_group = {"head": 0, "layer.2": 1, "layer.1": 2, "layer.0": 3, "embeddings": 4}
    for name, param in model.named_parameters():
        if name.startswith("classifier."):
            depth = 0
        elif name.startswith("bert.embeddings."):
            depth = 4
        elif name.startswith("bert.pooler."):
            depth = 1
        else:
            depth = depth_of_group[f"layer.{int(name.split('.')[3])}"]
        assert rate_of[id(param)] == pytest.approx(expected(lr, depth)), name
        assert decay_of[id(param)] == (0.01 if param.dim() >= 2 else 0.0), name
    # the optimizer the loop builds from these groups keeps the rates
    from fastft.train.config import OptimConfig
    from fastft.train.optim import build_optimizer

    optimizer = build_optimizer(model, OptimConfig(lr=lr), param_groups)
    embeddings = model.bert.embeddings.word_embeddings.weight
    group = next(g for g in optimizer.param_groups if any(p is embeddings for p in g["params"]))
    assert group["lr"] == pytest.approx(expected(lr, 4))


def test_lr_schemes_parse_from_names_mappings_and_objects():
    assert LRScheme.parse("discriminative") == Discriminative(factor=2.6)
    assert LRScheme.parse({"name": "layerwise", "factor": 0.5}) == LayerwiseDecay(factor=0.5)
    scheme = Discriminative(factor=2.0)
    assert LRScheme.parse(scheme) is scheme and LRScheme.parse(None) is None
    assert LRScheme.parse({"factor": 3.0}, current=scheme) == Discriminative(factor=3.0)  # factor=3 on the command line
    with pytest.raises(ValueError, match=r"layerwise: factor must be in \(0, 1\]"):
        LayerwiseDecay(factor=1.5)
    with pytest.raises(ValueError, match="discriminative: factor must be > 0"):
        LRScheme.parse({"name": "discriminative", "factor": 0})
    with pytest.raises(TypeError, match=r"lr_scheme 'layerwise' got unexpected option\(s\) \['decay'\]"):
        LRScheme.parse({"name": "layerwise", "decay": 0.5})


def test_unknown_lr_scheme_is_rejected():
    with pytest.raises(ValueError, match="lr_scheme"):
        lr_param_groups(tiny_bert(), 1e-3, 0.0, "triangular")


# ------------------------------------------------------------------------ freezing


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_strategies_parse_from_names_mappings_and_objects():
    assert Strategy.parse("full") == Full() and Strategy.parse("features") == Features()
    assert Strategy.parse({"name": "freeze", "first": 2}) == Freeze(first=2)
    assert Strategy.parse("gradual-unfreeze") == GradualUnfreeze(every=1, schedule=None, on="epoch", metric="loss",
                                                                 mode="min", patience=1)
    lora = Strategy.parse("lora")
    assert lora == LoRA() and lora.rank is None and lora.peft_options() == {}  # None: fastft.peft's defaults
    assert Strategy.parse({"rank": 16}, current=LoRA(rank=8, alpha=4)) == LoRA(rank=16, alpha=4)  # strategy.rank=16
    for strategy, method in [(LoRA(rank=2), "lora"), (Adapter(), "adapter"), (Prefix(), "prefix"), (Prompt(), "prompt"),
                             (Full(), None), (Freeze(first=1), None)]:
        assert strategy.peft_method == method
        assert Strategy.parse(strategy.spec()) == strategy  # what run_config.json and the bundle store
    assert LoRA(rank=4, target_modules=["query"]).spec() == {
        "name": "lora", "rank": 4, "alpha": None, "dropout": None, "target_modules": ["query"], "rslora": None,
        "modules_to_save": None,
    }


def test_features_trains_only_the_head():
    model = tiny_bert()
    plan = Features().apply(model)
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    assert set(plan.frozen) == {n for n, _ in model.named_parameters()} - _trainable(model)
    assert plan.groups.names == ["embeddings", "layer.0", "layer.1", "layer.2", "head"] and plan.callbacks == []


def test_freeze_first_and_train_last():
    model = tiny_bert()
    Strategy.parse({"name": "freeze", "first": 1}).apply(model)
    trainable = _trainable(model)
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in trainable)
    assert any(n.startswith("bert.encoder.layer.1.") for n in trainable)
    model = tiny_bert()
    Freeze(train_last=1).apply(model)
    trainable = _trainable(model)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.")) for n in trainable)
    assert any(n.startswith("bert.encoder.layer.2.") for n in trainable) and "classifier.weight" in trainable


def test_freeze_with_extra_layers_adds_a_trainable_head():
    model = tiny_bert()
    Freeze(train_last=0, extra_layers=2).apply(model)
    assert isinstance(model.classifier, torch.nn.Sequential)
    assert _trainable(model) == {n for n, _ in model.classifier.named_parameters(prefix="classifier")}
    out = model(input_ids=torch.randint(0, 97, (3, 7))).logits
    assert out.shape == (3, 2)


@pytest.mark.parametrize("strategy,options,message", [
    ("freeze", {"first": 4}, "first=4 but the model has only 3 layers"),
    ("freeze", {"train_last": 9}, "only 3 layers"),
    ("freeze", {}, "exactly one of"),
    ("freeze", {"first": 1, "train_last": 1}, "exactly one of"),
    ("gradual-unfreeze", {"schedule": [1, 2, 3, 4, 5]}, "only 4 layer groups"),
    ("gradual-unfreeze", {"schedule": [2, 1]}, "increasing"),
    ("gradual-unfreeze", {"on": "step"}, "gradual-unfreeze: on must be 'epoch' or 'plateau'"),
    ("full", {"first": 1}, r"strategy 'full' got unexpected option\(s\) \['first'\]"),
    ("freeze", {"freeze_first": 1}, r"strategy 'freeze' got unexpected option\(s\) \['freeze_first'\]"),  # the old name
    ("sideways", {}, r"unknown strategy 'sideways'; choose one of \["),
])
def test_options_that_do_not_fit_are_refused(strategy, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Strategy.parse({"name": strategy, **options}).apply(tiny_bert())


def test_unfreeze_schedule_beyond_the_run_is_refused():
    with pytest.raises(ValueError, match="only 2 epoch"):
        GradualUnfreeze(schedule=[1, 2]).apply(tiny_bert(), epochs=2)
    with pytest.raises(ValueError, match="only 2 epoch"):
        GradualUnfreeze(schedule=[1, 2]).check(2)  # what finetune asks before anything else
    GradualUnfreeze(schedule=[1, 2]).check(3)
    GradualUnfreeze(schedule=[1, 2]).check(None)  # a step-based run: no epoch count to check against


def test_a_new_head_strategy_needs_a_head():
    config = bert_config(97, hidden_size=16, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=32, dropout=0.1)
    with pytest.raises(ValueError, match="strategy 'features' trains a new task head first, but BertForMaskedLM has none"):
        Features().apply(transformers.BertForMaskedLM(config))


def test_gradual_unfreezing_order_on_epochs_and_schedule():
    model = tiny_bert()
    plan = Strategy.parse("gradual-unfreeze").apply(model)
    (callback,) = plan.callbacks
    assert plan.frozen == []  # the frozen set shrinks during the run
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    state = SimpleNamespace(epoch=0, step=5)
    seen = []
    for epoch in range(5):
        state.epoch, state.step = epoch, 5 * (epoch + 1)
        callback.on_epoch_end(state)
        seen.append(sorted({n.split(".")[3] if n.startswith("bert.encoder") else n.split(".")[1]
                            for n in _trainable(model) if n.startswith("bert.")}))
    assert seen[0] == ["2", "pooler"]
    assert seen[1] == ["1", "2", "pooler"]
    assert seen[2] == ["0", "1", "2", "pooler"]
    assert seen[3] == ["0", "1", "2", "embeddings", "pooler"]
    assert seen[4] == seen[3]  # nothing left to unfreeze
    assert [h[2] for h in callback.history] == ["layer.2", "layer.1", "layer.0", "embeddings"]
    assert [h[0] for h in callback.history] == [0, 1, 2, 3]

    model = tiny_bert()
    (callback,) = GradualUnfreeze(schedule=[2, 3]).apply(model).callbacks
    for epoch in range(4):
        callback.on_epoch_end(SimpleNamespace(epoch=epoch, step=epoch))
    assert [(h[0], h[2]) for h in callback.history] == [(1, "layer.2"), (2, "layer.1")]


def test_gradual_unfreezing_on_plateau():
    model = tiny_bert()
    (callback,) = GradualUnfreeze(on="plateau", patience=2).apply(model).callbacks
    state = SimpleNamespace(epoch=0, step=0)
    for step, loss in enumerate([1.0, 0.9, 0.95, 0.91, 0.5, 0.6, 0.7]):
        state.step = step
        callback.on_evaluate(state, {"loss": loss})
    # plateau after 0.9 (0.95, 0.91 no better) -> layer.2 at step 3; best reset; 0.5 best, 0.6, 0.7 -> layer.1 at step 6
    assert [(h[1], h[2]) for h in callback.history] == [(3, "layer.2"), (6, "layer.1")]
    restored = GradualUnfreezing(model, layer_groups(model))
    restored.load_state_dict(callback.state_dict())
    assert restored.unfrozen == 2


def test_peft_strategy_freezes_the_base():
    model = tiny_bert()
    strategy = Strategy.parse({"name": "lora", "rank": 2, "target_modules": ["query", "value"]})
    plan = strategy.apply(model)
    trainable = _trainable(model)
    assert strategy.peft_method == "lora"
    assert "classifier.weight" in trainable
    assert all("lora" in n or n.startswith("classifier.") for n in trainable)
    assert any("lora" in n for n in trainable)
    assert set(plan.frozen) == {n for n, _ in model.named_parameters()} - trainable
