"""``fastft info``: versions, and for each op which backends can run here and why not."""

from __future__ import annotations

import argparse
import importlib
import platform

import torch

import fastft
from fastft import _extension, _precision

# op name -> module exposing PRIORITY and backend_reasons(...)
OPS = {
    "attention": "fastft.ops.attention",
    "linear_cross_entropy": "fastft.ops.linear_cross_entropy",
    "lora_linear": "fastft.ops.lora_linear",
}


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 - any failure to import is reported as such
        return f"not available ({type(err).__name__}: {err})"


def _typical_inputs(op_name: str, device: torch.device) -> tuple:
    """Small inputs of the usual dtype on ``device``: what ``backend_reasons`` judges."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if op_name == "attention":
        q = torch.empty(1, 2, 16, 64, device=device, dtype=dtype)  # (batch, heads, seq, head_dim)
        return q, q, q
    return torch.empty(8, 64, device=device, dtype=dtype), torch.empty(32, 64, device=device, dtype=dtype)


def precision_lines(device: torch.device, measure: bool = True) -> list[str]:
    """What fastft found about bf16 on this CPU (and GPU), the matmul speeds measured
    here, and the precision ``precision="auto"`` picks."""
    lines = ["precision:", f"  cpu: {_precision.cpu_bf16().describe()}"]
    if measure:
        fp32, bf16 = _precision.matmul_gflops(torch.float32), _precision.matmul_gflops(torch.bfloat16)
        lines.append(f"  cpu matmul measured here (128x256 @ 256x256, one thread): fp32 {fp32:.1f} GFLOP/s, "
                     f"bf16 {bf16:.1f} GFLOP/s")
    for where in ([device] if device.type == "cpu" else [device, torch.device("cpu")]):
        choice, why = _precision.recommended_precision(where)
        lines.append(f"  recommended for {where.type} (precision=auto): {choice} ({why})")
    return lines


def report() -> str:
    lines = [f"fastft {fastft.__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for name in ("torch", "triton", "transformers", "datasets", "peft"):
        lines.append(f"{name} {_version(name)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines.append(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA GPU visible)'}")
    build = _extension.build_info()
    if _extension.load_error() is None:
        lines.append(f"CUDA extension: loaded (archs {';'.join(build.get('archs', []))}, CUDA {build.get('cuda_version', '?')})")
        if cuda:
            for why in _extension.device_reasons(device):
                lines.append(f"  cannot run here: {why}")
    else:
        lines.append(f"CUDA extension: {_extension.load_error()}")
    lines.append("")
    lines += precision_lines(device)
    lines.append("")
    lines.append(f"backends for {device.type} inputs (auto takes the first 'yes' in priority order):")
    for op_name, module_name in OPS.items():
        module = importlib.import_module(module_name)
        reasons = module.backend_reasons(*_typical_inputs(op_name, device))
        lines.append(f"  {op_name}:")
        for backend in module.PRIORITY:
            why = reasons[backend]()
            lines.append(f"    {backend:<7} {'yes' if not why else 'no: ' + '; '.join(why)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="fastft info", description=__doc__).parse_args(argv)
    print(report())
    return 0
