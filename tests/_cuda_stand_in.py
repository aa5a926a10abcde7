"""A stand-in GPU and ``fastft._cuda`` so that every CUDA wrapper runs on a CPU.

Two levels:

* ``stand_in_gpu(monkeypatch, ...)`` makes ``fastft._extension`` see a loaded extension
  with the given bindings, built for ``archs`` with CUDA 13.0, a driver that supports it
  and a device of compute capability ``capability``. ``cuda_tensor`` makes tensors that
  say they live on a CUDA device (fake tensors: metadata only), which is all a reasons
  function reads.
* ``stand_in_gpu(monkeypatch, emulate=True)`` goes further: plain CPU tensors pass for
  CUDA tensors (``Tensor.is_cuda``, ``torch.cuda.device`` / ``current_stream``), and each
  binding is a torch emulation of its kernel that reads and writes the tensors through the
  raw addresses it is given, exactly as the kernel would (ctypes over the CPU tensors'
  memory). So the wrappers in ``fastft/ops/<op>_cuda.py`` run every line of their Python,
  numbers included, and a wrong stride, pointer or dtype code gives wrong numbers here.

Every call of a stand-in binding is checked against the pybind11 bindings as written in
``csrc/<op>/bindings.h``: the keyword names and their order must be those of the
``py::arg`` list, which must itself name the C++ function's (or lambda's) parameters in
order, and each value must have the parameter's C++ type (a pointer is an int >= 0, a
``bool`` a bool, a ``Strides3`` three ints). ``BINDINGS_CPP`` is what the parse found;
``calls`` on the stand-in module records every launch (name, keyword arguments).

Import as ``from _cuda_stand_in import cuda_tensor, stand_in_gpu``.
"""

from __future__ import annotations

import ctypes
import re
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft import _extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"
BINDINGS = ("attention_forward", "attention_backward", "linear_cross_entropy_softmax_grad", "lora_fused_linear")
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


# --------------------------------------------------------------------------- the bindings as written


@dataclass(frozen=True)
class Binding:
    name: str
    args: tuple[str, ...]  # the py::arg names, in order
    params: tuple[tuple[str, str], ...]  # (C++ type, name) of the bound function's parameters, in order


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {open_: 1, close: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced {open_!r} from offset {start}")


def _split_params(text: str) -> list[tuple[str, str]]:
    """'std::uintptr_t q, Strides3 k_strides' -> [('std::uintptr_t', 'q'), ('Strides3', 'k_strides')]."""
    params, depth, current = [], 0, ""
    for ch in text:
        depth += {"<": 1, ">": -1, "(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            params.append(current)
            current = ""
        else:
            current += ch
    params.append(current)
    out = []
    for param in (" ".join(p.split()) for p in params):
        if param:
            type_, name = param.rsplit(" ", 1)
            out.append((type_.replace("const ", "").replace("&", "").strip(), name))
    return out


def _function_params(op_dir: Path, function: str) -> list[tuple[str, str]]:
    for header in sorted(op_dir.glob("*.h")):
        text = re.sub(r"//[^\n]*", "", header.read_text())
        match = re.search(rf"\bvoid\s+{function}\s*\(", text)
        if match:
            start = match.end() - 1
            return _split_params(text[start + 1:_balanced(text, start) - 1])
    raise ValueError(f"no declaration of {function} in {op_dir}")


def parse_bindings(csrc: Path = CSRC) -> dict[str, Binding]:
    """Every ``m.def`` of ``csrc/<op>/bindings.h``: its py::arg names and bound parameters."""
    found = {}
    for path in sorted(csrc.glob("*/bindings.h")):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        for match in re.finditer(r"\bm\.def\s*\(", text):
            start = match.end() - 1
            body = text[start:_balanced(text, start)]
            name = re.search(r'"([A-Za-z_0-9]+)"', body).group(1)
            args = tuple(re.findall(r'py::arg\(\s*"([A-Za-z_0-9]+)"\s*\)', body))
            pointer = re.match(r'\(\s*"[^"]*"\s*,\s*&\s*([A-Za-z_0-9:]+)', body)
            if pointer:
                params = _function_params(path.parent, pointer.group(1).split("::")[-1])
            else:  # a lambda: [captures](params) { ... }
                lambda_start = body.index("](") + 1
                params = _split_params(body[lambda_start + 1:_balanced(body, lambda_start) - 1])
            found[name] = Binding(name, args, tuple(params))
    return found


BINDINGS_CPP = parse_bindings()

_INT_TYPES = {"int", "int64_t", "std::int64_t", "int32_t", "std::int32_t"}
_POINTER_TYPES = {"std::uintptr_t", "uintptr_t"}
_FLOAT_TYPES = {"float", "double"}


def _check_value(binding: str, name: str, cpp_type: str, value) -> None:
    where = f"{binding}({name}: {cpp_type})"
    if cpp_type in _POINTER_TYPES:
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{where} got {value!r}"
    elif cpp_type in _INT_TYPES:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where} got {value!r}"
        limit = 2**31 if cpp_type in ("int", "int32_t", "std::int32_t") else 2**63
        assert -limit <= value < limit, f"{where} overflows: {value}"
    elif cpp_type == "bool":
        assert isinstance(value, bool), f"{where} got {value!r}"
    elif cpp_type in _FLOAT_TYPES:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} got {value!r}"
    elif cpp_type == "Strides3":
        assert (isinstance(value, (tuple, list)) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)), f"{where} got {value!r}"
    else:
        raise AssertionError(f"{where}: the stand-in does not know the C++ type {cpp_type!r}")


def check_call(name: str, kwargs: dict) -> None:
    """Assert that a call ``name(**kwargs)`` fits the binding as csrc/ declares it."""
    binding = BINDINGS_CPP[name]
    assert tuple(kwargs) == binding.args, (
        f"{name}: called with {tuple(kwargs)}, csrc binds {binding.args} (names and order must match)")
    for (cpp_type, param), arg in zip(binding.params, binding.args):
        _check_value(name, arg, cpp_type, kwargs[arg])


# --------------------------------------------------------------------------- raw memory

def view(address: int, dtype: torch.dtype, shape, strides) -> torch.Tensor:
    """The tensor at device address ``address`` (here: CPU memory) with element ``strides``,
    as a kernel sees it. Writes go to the caller's tensor."""
    assert address != 0, "null pointer"
    shape, strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    if any(s == 0 for s in shape):
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert address % itemsize == 0, f"misaligned {dtype} address {address:#x}"
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    raw = (ctypes.c_byte * (span * itemsize)).from_address(address)
    return torch.frombuffer(raw, dtype=dtype).as_strided(shape, strides)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# --------------------------------------------------------------------------- emulated kernels


def _softmax_grad(*, logits, rows, vocab, bias, bias_dtype, labels, label_smoothing, row_scale, write_in_place,
                  grad_logits_16, grad_logits_16_dtype, loss, lse, stream):
    """csrc/linear_cross_entropy/linear_cross_entropy.h, in fp32 like the kernel."""
    if rows == 0:
        return
    z = view(logits, torch.float32, (rows, vocab), (vocab, 1))
    y = view(labels, torch.int64, (rows,), (1,))
    if bias:
        z_b = z + view(bias, DTYPES[bias_dtype], (vocab,), (1,)).float()
    else:
        z_b = z.clone()
    row_lse = torch.logsumexp(z_b, dim=1)
    valid = (y >= 0) & (y < vocab)
    target = z_b.gather(1, y.clamp(0, vocab - 1)[:, None])[:, 0]
    row_loss = torch.where(valid, row_lse - (1 - label_smoothing) * target, torch.nan)
    if label_smoothing:
        row_loss = row_loss - label_smoothing * z_b.mean(dim=1)
    view(loss, torch.float32, (rows,), (1,)).copy_(row_loss)
    if lse:
        view(lse, torch.float32, (rows,), (1,)).copy_(row_lse)
    if not row_scale or not (write_in_place or grad_logits_16):
        return
    grad = torch.exp(z_b - row_lse[:, None]) - label_smoothing / vocab
    grad[torch.arange(rows)[valid], y[valid]] -= 1 - label_smoothing
    grad *= view(row_scale, torch.float32, (rows,), (1,))[:, None]
    if grad_logits_16:
        view(grad_logits_16, DTYPES[grad_logits_16_dtype], (rows, vocab), (vocab, 1)).copy_(grad)
    if write_in_place:
        z.copy_(grad)


def _key_mask(address, batch_stride, batch, seqlen_k):
    if not address:
        return None
    return view(address, torch.uint8, (batch, seqlen_k), (batch_stride, 1)) != 0


def _attention_tensors(kw, names, heads, seqlen):
    dtype = DTYPES[kw["dtype"]]
    batch, head_dim = kw["batch"], kw["head_dim"]
    return [view(kw[name], dtype, (batch, heads, seqlen, head_dim), (*kw[f"{name}_strides"], 1)) for name in names]


def _attention_window(kw):
    """(window, causal_alignment) attention_ref takes for the kernels' window arguments."""
    return (kw["window_left"], kw["window_right"]), ("bottom-right" if kw["bottom_right"] else "top-left")


def _attention_math(q, k, v, mask, kw):
    """fp32 out and lse of csrc/attention (window, alignment, softcap; no-key rows: out 0, lse -inf)."""
    from fastft.ops.attention import attention_ref

    window, alignment = _attention_window(kw)
    return attention_ref(q.float(), k.float(), v.float(), window=window, causal_alignment=alignment,
                         softcap=kw["softcap"], key_padding_mask=mask, softmax_scale=kw["softmax_scale"],
                         return_lse=True)


def _attention_forward(**kw):
    q, = _attention_tensors(kw, ["q"], kw["heads_q"], kw["seqlen_q"])
    k, v = _attention_tensors(kw, ["k", "v"], kw["heads_kv"], kw["seqlen_k"])
    out, = _attention_tensors(kw, ["out"], kw["heads_q"], kw["seqlen_q"])
    mask = _key_mask(kw["key_padding_mask"], kw["mask_batch_stride"], kw["batch"], kw["seqlen_k"])
    result, lse = _attention_math(q, k, v, mask, kw)
    out.copy_(result)
    shape = (kw["batch"], kw["heads_q"], kw["seqlen_q"])
    view(kw["lse"], torch.float32, shape, contiguous_strides(shape)).copy_(lse)


def _attention_backward(**kw):
    dtype = DTYPES[kw["dtype"]]
    batch, heads_q, heads_kv = kw["batch"], kw["heads_q"], kw["heads_kv"]
    seqlen_q, seqlen_k, head_dim = kw["seqlen_q"], kw["seqlen_k"], kw["head_dim"]
    q, grad_out, out = _attention_tensors(kw, ["q", "grad_out", "out"], heads_q, seqlen_q)
    k, v, grad_k, grad_v = _attention_tensors(kw, ["k", "v", "grad_k", "grad_v"], heads_kv, seqlen_k)
    mask = _key_mask(kw["key_padding_mask"], kw["mask_batch_stride"], batch, seqlen_k)
    rows = (batch, heads_q, seqlen_q)
    delta = (grad_out.float() * out.float()).sum(-1)
    if kw["grad_lse"]:  # the kernel's delta less the lse's gradient (contiguous (B, Hq, Sq))
        delta = delta - view(kw["grad_lse"], torch.float32, rows, contiguous_strides(rows))
    view(kw["delta"], torch.float32, rows, contiguous_strides(rows)).copy_(delta)
    # The FlashAttention backward written out (no autograd: custom ops run below it).
    scale, softcap, group = kw["softmax_scale"], kw["softcap"], heads_q // heads_kv
    q32, do32 = q.float(), grad_out.float()
    k32, v32 = (t.float().repeat_interleave(group, dim=1) for t in (k, v))  # (B, Hq, Sk, D)
    _, lse = _attention_math(q, k, v, mask, kw)
    scores = scale * q32 @ k32.transpose(-1, -2)
    tanh = torch.tanh(scores / softcap) if softcap else None
    if softcap:
        scores = softcap * tanh
    probs = torch.exp(scores - lse[..., None])  # 0 where masked, no-key rows
    (left, right), _ = _attention_window(kw)
    diagonal = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q if kw["bottom_right"] else 0)
    key = torch.arange(seqlen_k)[None, :]
    allowed = ((right < 0) | (key <= diagonal + right)) & ((left < 0) | (key >= diagonal - left))
    allowed = allowed[None, None] if mask is None else allowed[None, None] & mask[:, None, None, :]
    probs = torch.where(allowed, probs, 0.0)
    grad_probs = do32 @ v32.transpose(-1, -2)
    grad_scores = probs * (grad_probs - delta[..., None])
    if softcap:
        grad_scores = grad_scores * (1 - tanh * tanh)
    dq = scale * grad_scores @ k32
    dk = (scale * grad_scores.transpose(-1, -2) @ q32).unflatten(1, (heads_kv, group)).sum(2)
    dv = (probs.transpose(-1, -2) @ do32).unflatten(1, (heads_kv, group)).sum(2)
    # dQ goes through the zeroed fp32 accumulator (unscaled), then the conversion kernel.
    accum_shape = (batch, heads_q, seqlen_q, head_dim)
    accum = view(kw["grad_q_accum"], torch.float32, accum_shape, contiguous_strides(accum_shape))
    assert not accum.any(), "grad_q_accum must arrive zeroed"
    accum += dq / kw["softmax_scale"]
    view(kw["grad_q"], dtype, accum_shape, contiguous_strides(accum_shape)).copy_(accum * kw["softmax_scale"])
    grad_k.copy_(dk)
    grad_v.copy_(dv)


def _lora_fused_linear(**kw):
    """csrc/lora_linear/lora_linear.h: out[z] = [out +] X W' [+ bias] + scale * mask∘(L R')."""
    dtype = DTYPES[kw["dtype"]]
    rows, cols, reduce, rank = kw["rows"], kw["cols"], kw["reduce"], kw["rank"]
    assert kw["threshold"] <= 1 << 24 and 0 <= kw["seed_key"] < 1 << 32
    k_per_split = kw["k_per_split"] if kw["k_per_split"] > 0 else max(reduce, 1)
    splits = -(-reduce // k_per_split) if reduce > 0 else 1
    if rows == 0 or cols == 0:
        return

    def keep(num_rows, num_cols):  # x's dropout keep-mask at (token, feature), from the kernel's key
        return _keep_from_key(kw["seed_key"], kw["threshold"], num_rows, num_cols)

    out_dtype = torch.float32 if kw["out_fp32"] else dtype
    for z in range(splits):
        acc = torch.zeros(rows, cols)
        if reduce > 0:
            k0, k1 = z * k_per_split, min((z + 1) * k_per_split, reduce)
            x = view(kw["x"], dtype, (rows, reduce), (kw["stride_xm"], kw["stride_xk"]))[:, k0:k1].float()
            w_dtype = torch.int8 if kw["weight_int8"] else dtype
            w = view(kw["w"], w_dtype, (reduce, cols), (kw["stride_wk"], kw["stride_wn"]))[k0:k1].float()
            if kw["weight_int8"]:
                scales = view(kw["w_scale"], torch.float32, (cols if kw["scale_along_n"] else reduce,), (1,))
                w = w * (scales[None, :] if kw["scale_along_n"] else scales[k0:k1, None])
                w = w.to(dtype).float()  # dequantised, rounded once to the activation dtype
            if kw["mask_x"]:
                x = x * keep(rows, reduce)[:, k0:k1]
            if kw["mask_w"]:
                w = w * keep(reduce, cols)[k0:k1]
            acc += x @ w
        if rank > 0:
            lo = view(kw["lora_l"], dtype, (rows, rank), (kw["stride_lm"], kw["stride_lr"])).float()
            up = view(kw["lora_r"], dtype, (rank, cols), (kw["stride_rr"], kw["stride_rn"])).float()
            lora = (lo @ up) * kw["scale"]
            if kw["mask_lora"]:
                lora = lora * keep(rows, cols)
            acc += lora
        if kw["bias"]:
            acc += view(kw["bias"], dtype, (cols,), (1,)).float()
        out = view(kw["out"] + z * kw["stride_os"] * out_dtype.itemsize, out_dtype, (rows, cols),
                   (kw["stride_om"], kw["stride_on"]))
        if kw["accumulate"]:
            acc += out.float()
        out.copy_(acc)


def _keep_from_key(seed_key: int, threshold: int, num_rows: int, num_cols: int) -> torch.Tensor:
    """lora_linear's keep-mask from the kernel's (seed key, threshold): the hash of
    fastft/ops/lora_linear.py's docstring, on int64 tensors."""
    mask32 = 0xFFFFFFFF

    def mix(h):
        h = h ^ (h >> 16)
        h = (h * 0x7FEB352D) & mask32
        h = h ^ (h >> 15)
        h = (h * 0x846CA68B) & mask32
        return h ^ (h >> 16)

    tokens = torch.arange(num_rows, dtype=torch.int64)
    features = torch.arange(num_cols, dtype=torch.int64)
    row_hash = mix(tokens ^ seed_key)
    return (mix(row_hash[:, None] ^ features[None, :]) >> 8) >= threshold


EMULATIONS = {
    "linear_cross_entropy_softmax_grad": _softmax_grad,
    "attention_forward": _attention_forward,
    "attention_backward": _attention_backward,
    "lora_fused_linear": _lora_fused_linear,
}


# --------------------------------------------------------------------------- the stand-in


def _binding(name: str, module: types.SimpleNamespace, emulate: bool):
    def call(*args, **kwargs):
        assert not args, f"{name}: the wrappers pass every argument by keyword, got {len(args)} positional"
        check_call(name, kwargs)
        module.calls.append((name, dict(kwargs)))
        module.guards.append(module.device_guard[-1] if module.device_guard else None)
        if not emulate:
            raise AssertionError(f"the stand-in fastft._cuda cannot launch {name} without emulate=True")
        EMULATIONS[name](**kwargs)

    return call


class _Stream:
    cuda_stream = 0


class _DeviceGuard:
    """``torch.cuda.device(d)``: records ``d`` as the current device while it is entered."""

    def __init__(self, stack, device):
        self.stack, self.device = stack, device

    def __enter__(self):
        self.stack.append(torch.device(self.device) if self.device is not None else None)

    def __exit__(self, *exc):
        self.stack.pop()


def stand_in_gpu(monkeypatch, *, capability=(9, 0), archs=("80", "90a"), bindings=BINDINGS,
                 emulate: bool = False) -> types.SimpleNamespace:
    """Patch (through pytest's ``monkeypatch``, undone after the test) what the wrappers read;
    returns the stand-in module: ``calls`` records every launch (name, keyword arguments),
    ``guards`` the device a ``torch.cuda.device`` guard had made current at each (None: no
    guard, the launch would go to whatever device is current)."""
    stand_in = types.SimpleNamespace(calls=[], guards=[], device_guard=[])
    for name in bindings:
        setattr(stand_in, name, _binding(name, stand_in, emulate))
    monkeypatch.setattr(_extension, "_module", stand_in)
    monkeypatch.setattr(_extension, "_load_error", None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"archs": list(archs), "cuda_version": "13.0"})
    monkeypatch.setattr(_extension, "_driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if emulate:  # CPU tensors pass for CUDA tensors; the device guard and stream are no-ops
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cpu", "cuda")),
                            raising=False)
        monkeypatch.setattr(torch.cuda, "device", lambda device=None: _DeviceGuard(stand_in.device_guard, device))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        _enable_fp32_output_gemms_on_cpu()
    return stand_in


_CPU_GEMMS = None


def _enable_fp32_output_gemms_on_cpu() -> None:
    """CUDA's ``mm`` (with and without ``out=``) / ``addmm`` / ``baddbmm`` with ``out_dtype=torch.float32`` (16-bit
    inputs, fp32 result), which the CUDA loss backend uses, for CPU tensors: fp32 math on
    upcast inputs. Registered once per process (they only fill a kernel CPU lacks)."""
    global _CPU_GEMMS
    if _CPU_GEMMS is not None:
        return
    library = torch.library.Library("aten", "IMPL")

    def mm(a, b, out_dtype, *, out):
        return out.copy_(a.float() @ b.float())

    def mm_functional(a, b, out_dtype):
        return (a.float() @ b.float()).to(out_dtype)

    def addmm(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        return out.copy_(beta * acc.float() + alpha * (a.float() @ b.float()))

    def baddbmm(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        return out.copy_(beta * acc.float() + alpha * (a.float() @ b.float()))

    try:
        library.impl("mm.dtype_out", mm, "CPU")
        library.impl("mm.dtype", mm_functional, "CPU")
        library.impl("addmm.dtype_out", addmm, "CPU")
        library.impl("baddbmm.dtype_out", baddbmm, "CPU")
    except RuntimeError:  # this torch has them on CPU already, or not at all: the probe decides
        pass
    _CPU_GEMMS = library


_FAKE_MODE = FakeTensorMode()


def cuda_tensor(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A tensor on ``cuda:0`` with this shape and dtype, and no data."""
    with _FAKE_MODE:
        return torch.empty(*shape, dtype=dtype, device="cuda")

