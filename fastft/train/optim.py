"""The optimizer: AdamW over parameter groups, with the fused kernel where it is faster."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "default_param_groups", "fused_adamw_supported"]


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (weights, embeddings) decay; biases and norm scales do not
    (the split nanoGPT uses: decay iff ``param.dim() >= 2``). Frozen parameters are
    included, so unfreezing them later needs no new optimizer (AdamW skips ``grad=None``)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_supported(groups: list[dict], device: torch.device) -> bool:
    """Whether ``fused="auto"`` takes AdamW's fused kernel: on CUDA always; on a CPU for
    plain (not DTensor-sharded) tensors. On a CPU the per-parameter ("for-loop") AdamW
    makes ~6 passes over memory per parameter; the fused kernel makes one. For MiniLM
    (22.7M parameters, 12M of them the word embeddings) that is a fifth of a CPU training
    step (benchmarks/bench_finetune.py)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor either
        return True
    return not any(isinstance(p, DTensor) for g in groups for p in g["params"])


def build_optimizer(model, optim_config, param_groups=None, device=None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (list of dicts or ``fn(model) -> list``; groups without
    ``lr`` / ``weight_decay`` get the config's). ``fused="auto"``: see ``fused_adamw_supported``."""
    groups = param_groups(model) if callable(param_groups) else param_groups
    groups = default_param_groups(model, optim_config.weight_decay) if groups is None else groups
    groups = [{"lr": optim_config.lr, "weight_decay": optim_config.weight_decay, **g, "params": list(g["params"])}
              for g in groups]
    groups = [g for g in groups if g["params"]]
    fused = optim_config.fused
    if fused == "auto":
        fused = device is not None and fused_adamw_supported(groups, device)
    return torch.optim.AdamW(
        groups, lr=optim_config.lr, betas=tuple(optim_config.betas), eps=optim_config.eps, fused=bool(fused) or None
    )
