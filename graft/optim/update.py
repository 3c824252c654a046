"""The step a rule proposes, kept factored as coefficient × tensor.

A rule returns `Update(tensors, coeffs)`: per tensor i, the step it would add to the
weight is ``coeffs[i] * tensors[i]``. Keeping the coefficient apart lets a rule hand
back its state (SGD's momentum buffer) without copying it, and lets Graft fold its
scale into the coefficient, so applying a grafted step is one pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

Coeffs = float | Tensor | list[float] | list[Tensor]


@dataclass
class Update:
    """Per tensor i, the step ``coeffs[i] * tensors[i]`` (added to the weight).

    tensors: one per parameter, same shape and dtype as the parameter; read only, since
        they may be optimizer state itself (SGD hands back its momentum buffer).
    coeffs: one python float for all, a float per tensor, or a 0-d tensor per tensor
        (when the coefficient is itself computed on the device, e.g. a trust ratio). Under
        torch.compile also one 0-d tensor for all (rules/base.py: `traced_lr`).
    """

    tensors: list[Tensor]
    coeffs: Coeffs


# While set: how the squared norms of shards add up to their tensors' (sharded.py).
_SHARD_SUM: ContextVar[Callable[[Tensor], Tensor] | None] = ContextVar("shard_sum", default=None)


@contextmanager
def summed_over_shards(shard_sum: Callable[[Tensor], Tensor] | None) -> Iterator[None]:
    """`norms` of tensors that are shards of larger ones: their squares summed by
    `shard_sum` (an all-reduce over the ranks holding the other shards), so a rule's norms
    (LARS's and LAMB's trust ratios) are the whole tensors'. None: tensors are whole."""
    token = _SHARD_SUM.set(shard_sum)
    try:
        yield
    finally:
        _SHARD_SUM.reset(token)


def norms(tensors: list[Tensor]) -> Tensor:
    """‖t‖₂ per tensor, accumulated in at least fp32 (fp64 stays fp64), as one vector; of
    the whole tensors where `tensors` are shards (`summed_over_shards`)."""
    shard_sum = _SHARD_SUM.get()
    if shard_sum is None:
        return torch.stack(_norm_list(tensors))
    return shard_sum(torch.stack(_norm_list(tensors)).square()).sqrt()


def _norm_list(tensors: list[Tensor]) -> list[Tensor]:
    first = tensors[0]
    if first.dtype == torch.float32 and first.device.type == "cpu":
        return [_blocked_norm(tensor) for tensor in tensors]
    dtype = torch.promote_types(first.dtype, torch.float32)
    return torch._foreach_norm(tensors, 2, dtype=dtype)


# torch's fp32 norm on a CPU sums long runs of squares in fp32: a relative error of 1e-4
# over 2.4M elements (ResNet-50's largest kernel). Norms of rows of this many elements, each
# taken by one thread, combined in fp64, give 1e-7, with the same result for any number of
# threads (as the native loops' block sums), at about a quarter more time for the norms.
NORM_BLOCK = 4096


def _blocked_norm(tensor: Tensor) -> Tensor:
    """‖t‖₂ of an fp32 CPU tensor to fp32 rounding, in fp32 (no temporary but the flat copy
    that reshape makes of a non-contiguous tensor)."""
    flat = tensor.reshape(-1)
    if flat.numel() <= NORM_BLOCK:  # one row: most biases and norm scales
        return torch.linalg.vector_norm(flat)
    whole = flat.numel() - flat.numel() % NORM_BLOCK
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK), dim=1).double()
    tail = torch.linalg.vector_norm(flat[whole:]).double()
    return (rows.square().sum() + tail.square()).sqrt().to(torch.float32)


def update_norms(update: Update) -> Tensor:
    """‖coeffs[i] * tensors[i]‖₂ per tensor, as one vector on the tensors' device.

    Accumulated in fp32 for 16-bit tensors (fp64 stays fp64; fp32 on a CPU by rows,
    `_blocked_norm`); nothing is synchronised.
    """
    norms = _norm_list(update.tensors)
    coeffs = update.coeffs
    if isinstance(coeffs, float | int | Tensor):
        torch._foreach_mul_(norms, abs(coeffs))
    elif coeffs and isinstance(coeffs[0], Tensor):
        torch._foreach_mul_(norms, torch._foreach_abs(coeffs))
    else:
        torch._foreach_mul_(norms, [abs(c) for c in coeffs])
    return torch.stack(norms)


def apply_update(params: list[Tensor], update: Update, scales: list[Tensor] | None = None) -> None:
    """params[i] += scales[i] * coeffs[i] * tensors[i], in place, one pass per tensor.

    scales: 0-d fp32 tensors (Graft's ‖u_M‖ / ‖u_D‖ ratios), or None for the bare update.
    """
    coeffs = update.coeffs
    if isinstance(coeffs, Tensor):
        coeffs = [coeffs] * len(params)
    if scales is None:
        if isinstance(coeffs, float | int):
            torch._foreach_add_(params, update.tensors, alpha=coeffs)
            return
        if isinstance(coeffs[0], Tensor):
            torch._foreach_addcmul_(params, update.tensors, coeffs)
            return
        factors = coeffs
        for param, tensor, factor in zip(params, update.tensors, factors, strict=True):
            param.add_(tensor, alpha=factor)
        return
    # Fold the rule's coefficient into Graft's scale: tiny 0-d ops, then one addcmul pass.
    factors = torch._foreach_mul(scales, coeffs)
    torch._foreach_addcmul_(params, update.tensors, factors)


@dataclass
class StepNorms:
    """‖u_M‖ and ‖u_D‖ per tensor at the last step: vectors (fp32, or fp64 for fp64
    parameters) on the parameters' device, aligned with `params` (the tensors that had
    a gradient). Without grafting (no direction, or M#M) `direction` is `magnitude`."""

    params: list[Tensor]
    magnitude: Tensor
    direction: Tensor
