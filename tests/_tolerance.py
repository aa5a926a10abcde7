"""DESIGN.md's tolerance rule as the one assertion every comparison with a reference uses.

The fast result's error against the fp32 (or finer) reference is at most twice the error
of the same computation done in plain torch at the input dtype against that reference,
plus a small atol:

    max |fast - reference| <= 2 * max |plain - reference| + atol

Import it as ``from _tolerance import assert_tolerance_rule`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import torch


def _at(t: torch.Tensor, flat_index: int) -> float:
    return t.reshape(-1)[flat_index].item()


def _index(shape: torch.Size, flat_index: int) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))


def assert_tolerance_rule(name: str, fast: torch.Tensor, reference: torch.Tensor, plain: torch.Tensor, *,
                          atol: float, relative_atol: bool = False) -> None:
    """Assert the rule for one tensor (an output or a gradient).

    Args:
        name: what the tensor is, for the failure message (``"dq"``, ``"bf16 grad_weight"``).
        fast: the result under test.
        reference: the oracle, computed in fp32 or finer.
        plain: the same computation in plain torch at the input dtype: its error sets the
            bound. ``fast`` and ``plain`` must share a dtype, all three a shape.
        atol: the small absolute slack on top of twice the plain error.
        relative_atol: ``atol`` is in units of the reference's largest magnitude (at least
            1), for tensors whose scale is far from 1 (e.g. gradients summed over rows).

    Non-finite reference entries (NaN where ``F.cross_entropy`` gives NaN, the ``-inf``
    log-sum-exp of a row with no key) must be matched exactly by ``fast``; the rule holds
    on the finite rest. On failure the message says which tensor, where its largest error
    is, the values there, the bound and how many elements exceed it.
    """
    assert fast.shape == reference.shape == plain.shape, (
        f"{name}: shapes differ: fast {tuple(fast.shape)}, reference {tuple(reference.shape)}, "
        f"plain {tuple(plain.shape)}")
    assert fast.dtype == plain.dtype, f"{name}: fast dtype {fast.dtype} differs from plain dtype {plain.dtype}"
    plain_dtype = str(plain.dtype).removeprefix("torch.")
    fast, reference, plain = (t.detach().double() for t in (fast, reference, plain))
    nonfinite_mismatch = ((fast.isnan() != reference.isnan()) | (fast.isinf() != reference.isinf())
                          | (fast.isinf() & (fast != reference)))
    if nonfinite_mismatch.any():
        first = int(nonfinite_mismatch.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{name}: {int(nonfinite_mismatch.sum())} of {fast.numel()} elements are non-finite in only one of "
            f"fast and reference (or differ there); first at index {_index(fast.shape, first)}: "
            f"fast {_at(fast, first)}, reference {_at(reference, first)}")
    finite = torch.isfinite(reference)
    if not finite.any():
        return
    fast_error = torch.where(finite, (fast - reference).abs(), 0.0)
    plain_error = (plain - reference).abs()[finite].max().item()
    slack = atol * max(1.0, reference[finite].abs().max().item()) if relative_atol else atol
    bound = 2 * plain_error + slack
    worst = int(fast_error.reshape(-1).argmax())
    if _at(fast_error, worst) <= bound:
        return
    raise AssertionError(
        f"{name}: error {_at(fast_error, worst):.3e} at index {_index(fast.shape, worst)} "
        f"(fast {_at(fast, worst):.6g}, reference {_at(reference, worst):.6g}) exceeds the bound {bound:.3e} "
        f"= 2 x plain {plain_dtype} error {plain_error:.3e} + atol {slack:.1e}; "
        f"{int((fast_error > bound).sum())} of {int(finite.sum())} finite elements exceed it")
