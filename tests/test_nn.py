"""fastft.nn: LoRALinear, Adapter, PrefixEncoder, PromptEmbedding."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _tolerance import assert_tolerance_rule

from fastft.nn import Adapter, LoRALinear, PrefixEncoder, PromptEmbedding
from fastft.ops.lora_linear import lora_linear, lora_linear_ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def _lora(in_features, out_features, rank, dtype=torch.float32, bias=True, **kwargs):
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = LoRALinear(base, rank=rank, **kwargs)
    with torch.no_grad():  # B is zero at init; tests need a nonzero update
        layer.lora_b.normal_(0.0, 0.5)
    return layer


def _max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_lora_init_starts_at_base_model():
    base = nn.Linear(13, 7)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 13)
    assert torch.equal(layer.lora_b, torch.zeros(7, 4))
    assert layer.lora_a.abs().sum() > 0  # A random, else B would never get a gradient
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_lora_freezes_base_and_scaling():
    layer = _lora(13, 7, 4, alpha=8.0)
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    assert layer.scaling == pytest.approx(2.0)
    rs = _lora(13, 7, 4, alpha=8.0, use_rslora=True)
    assert rs.scaling == pytest.approx(8.0 / math.sqrt(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 13), (2, 7, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_forward_backward_matches_reference(dtype, shape, bias):
    layer = _lora(13, 113, 7, dtype=dtype, bias=bias, alpha=5.0)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out, x.grad, layer.lora_a.grad, layer.lora_b.grad]

    def reference(upcast):
        xr = x.detach().clone().requires_grad_(True)
        a = layer.lora_a.detach().clone().requires_grad_(True)
        b = layer.lora_b.detach().clone().requires_grad_(True)
        y = lora_linear_ref(xr, layer.base_layer.weight, layer.base_layer.bias, a, b, layer.scaling, upcast=upcast)
        y.backward(grad.to(y.dtype))
        return [y, xr.grad, a.grad, b.grad]

    fp32 = reference(True)
    same_dtype = reference(False)
    for name, g, r, s in zip(["out", "dx", "dA", "dB"], got, fp32, same_dtype):
        assert g.dtype == dtype
        # atol: a few fp32 ulps of the largest value (sums run in a different order).
        assert_tolerance_rule(name, g, r, s, atol=1e-6, relative_atol=True)
    assert layer.base_layer.weight.grad is None


def test_lora_autocast_casts_like_nn_linear():
    """Under torch.autocast an fp32 LoRALinear computes in the autocast dtype (the fused op
    is a custom op autocast does not cast), as nn.Linear would."""
    layer = _lora(13, 113, 7, alpha=5.0)
    x = torch.randn(2, 7, 13, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    grad = torch.randn_like(out)
    out.backward(grad)
    w, b, a, bb = layer.base_layer.weight, layer.base_layer.bias, layer.lora_a, layer.lora_b
    reference = lora_linear_ref(x.detach(), w, b, a.detach(), bb.detach(), layer.scaling)
    plain_bf16 = lora_linear_ref(*(t.detach().bfloat16() for t in (x, w, b, a, bb)), layer.scaling, upcast=False)
    assert_tolerance_rule("out", out, reference, plain_bf16, atol=1e-2)
    assert a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0 and bb.grad.abs().sum() > 0
    assert x.grad.dtype == torch.float32


def test_lora_dropout_only_in_training_and_with_the_ops_mask():
    layer = _lora(13, 7, 3, dropout=0.25)
    x = torch.randn(6, 13)
    layer.eval()
    torch.testing.assert_close(layer(x), lora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias,
                                                         layer.lora_a, layer.lora_b, layer.scaling))
    layer.train()
    # The op's documented contract: with seed=None the mask comes from torch's default
    # generator, so re-seeding replays it. LoRALinear must pass exactly its dropout on.
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    expected = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_a, layer.lora_b,
                           layer.scaling, dropout_p=0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, layer.eval()(x))  # dropout did drop something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_unmerge(dtype):
    layer = _lora(13, 7, 3, dtype=dtype, alpha=6.0)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 13, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    # Merged weight is W + s·BA rounded once to dtype: compare as the tolerance rule says.
    reference = lora_linear_ref(x, original, layer.base_layer.bias, layer.lora_a, layer.lora_b, layer.scaling)
    plain = lora_linear_ref(x, original, layer.base_layer.bias, layer.lora_a, layer.lora_b, layer.scaling,
                            upcast=False)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_tolerance_rule("merged", merged, reference, plain, atol=atol)
    assert _max_error(merged, unmerged) <= 2 * _max_error(plain, reference) + atol
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    step = torch.finfo(dtype).eps * original.abs().max().item() * 4
    assert _max_error(layer.base_layer.weight, original) <= step
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_lora_disable_gives_base_merged_or_not():
    layer = _lora(13, 7, 3)
    x = torch.randn(4, 13)
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base)
    layer.disabled = False
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)


def test_lora_on_transposed_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(11, 13)  # weight (13, 11): in=13, out=11
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = LoRALinear(conv, rank=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    assert (layer.in_features, layer.out_features) == (13, 11)
    x = torch.randn(3, 5, 13)
    expected = conv(x) + layer.scaling * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=-3)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(4, 4, 1), rank=2)


def test_adapter_near_identity_and_trains():
    adapter = Adapter(32, 7)
    h = torch.randn(2, 5, 32)
    out = adapter(h)
    assert out.shape == h.shape
    assert (out - h).abs().max() < 0.05 * h.abs().max()  # starts near the identity
    assert (out - h).abs().max() > 0  # but not exactly: both projections get gradients
    out.pow(2).sum().backward()
    assert adapter.down.weight.grad.abs().sum() > 0 and adapter.up.weight.grad.abs().sum() > 0
    expected = h + adapter.up(F.gelu(adapter.down(h)))
    torch.testing.assert_close(out.detach(), expected.detach())
    with pytest.raises(ValueError, match="bottleneck_size"):
        Adapter(32, 0)
    with pytest.raises(ValueError, match="activation"):
        Adapter(32, 4, activation="swish2")


@pytest.mark.parametrize("projection", [None, 17])
def test_prefix_encoder_shapes_and_materialize(projection):
    encoder = PrefixEncoder(num_virtual_tokens=3, num_layers=2, num_kv_heads=2, head_dim=5,
                            projection_hidden_size=projection)
    pairs = encoder(batch_size=4)
    assert len(pairs) == 2
    for key, value in pairs:
        assert key.shape == value.shape == (4, 2, 3, 5)
    # Batch rows share the same prefixes; keys differ from values and layers from layers.
    assert torch.equal(pairs[0][0][0], pairs[0][0][3])
    assert not torch.equal(pairs[0][0], pairs[0][1]) and not torch.equal(pairs[0][0], pairs[1][0])
    before = [t.detach().clone() for pair in pairs for t in pair]
    encoder.materialize()
    assert not encoder.reparametrized and encoder.mlp is None
    assert [n for n, _ in encoder.named_parameters()] == ["prefixes"]
    after = [t for pair in encoder(4) for t in pair]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)


def test_prefix_encoder_gradients_reach_mlp():
    encoder = PrefixEncoder(2, 1, 1, 4, projection_hidden_size=8)
    key, value = encoder(3)[0]
    (key.sum() + value.pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_prompt_embedding_inits():
    embeddings = nn.Embedding(50, 8)
    random_prompt = PromptEmbedding(4, embeddings, generator=torch.Generator().manual_seed(3))
    rows = random_prompt.prompt.detach()
    assert rows.shape == (4, 8)
    # Every row is one of the vocabulary's embeddings.
    distances = torch.cdist(rows, embeddings.weight.detach())
    assert torch.all(distances.min(dim=1).values == 0)
    text_prompt = PromptEmbedding(5, embeddings, init_token_ids=[7, 11])  # repeated to fill 5 slots
    torch.testing.assert_close(text_prompt.prompt.detach(), embeddings.weight.detach()[[7, 11, 7, 11, 7]])
    short = PromptEmbedding(1, embeddings, init_token_ids=[9, 2, 3])  # truncated
    torch.testing.assert_close(short.prompt.detach(), embeddings.weight.detach()[[9]])
    out = text_prompt(batch_size=3)
    assert out.shape == (3, 5, 8)
    out.sum().backward()
    assert torch.equal(text_prompt.prompt.grad, torch.full((5, 8), 3.0))
    assert embeddings.weight.grad is None  # the vocabulary is only read
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptEmbedding(0, embeddings)
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptEmbedding(2, embeddings, init_token_ids=[50])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_linear_module_on_gpu(dtype):
    """The module on CUDA (whatever backend `auto` picks) against the fp32 reference."""
    layer = _lora(113, 1023, 16, dtype=dtype, alpha=32.0).cuda()
    x = torch.randn(7, 113, 113, device="cuda", dtype=dtype, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    args = (layer.base_layer.weight, layer.base_layer.bias)
    for upcast, results in ((True, []), (False, [])):
        xr = x.detach().clone().requires_grad_(True)
        a = layer.lora_a.detach().clone().requires_grad_(True)
        b = layer.lora_b.detach().clone().requires_grad_(True)
        y = lora_linear_ref(xr, *args, a, b, layer.scaling, upcast=upcast)
        y.backward(grad.to(y.dtype))
        results.extend([y, xr.grad, a.grad, b.grad])
        if upcast:
            fp32 = results
        else:
            same_dtype = results
    for name, g, r, s in zip(["out", "dx", "dA", "dB"], [out, x.grad, layer.lora_a.grad, layer.lora_b.grad],
                             fp32, same_dtype):
        assert_tolerance_rule(name, g, r, s, atol=1e-3, relative_atol=True)
