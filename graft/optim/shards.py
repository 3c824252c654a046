"""Sharded tensors (DTensors, as FSDP2 makes parameters): this rank's shard of one, how it
is split, and norms of whole tensors from their shards' squared norms.

‖t‖² is the sum of its shards' ‖t_r‖², so squared norms taken on the shards become the whole
tensors' with one all-reduce over the ranks that hold the shards (per device mesh, for any
number of tensors at once). A plain tensor, or a DTensor replicated on every rank, is whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

Sharding = tuple[Any, tuple[int, ...]] | None  # (device mesh, its dims that shard) or None


def is_sharded(optimizer: Any) -> bool:
    """Whether any of an optimizer's parameters (its param groups') is a DTensor."""
    return any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])


def sharding(tensor: Tensor) -> Sharding:
    """The mesh and mesh dims over which `tensor` is split; None for a whole tensor."""
    if not isinstance(tensor, DTensor):
        return None
    dims = tuple(dim for dim, place in enumerate(tensor.placements) if place.is_shard())
    return (tensor.device_mesh, dims) if dims else None


def local(tensor: Tensor) -> Tensor:
    """This rank's shard (for a DTensor: its local tensor, which in-place ops update)."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def shard_sum(where: Sharding) -> Callable[[Tensor], Tensor] | None:
    """values -> values summed over the ranks that hold the shards (in place); None for
    whole tensors."""
    if where is None:
        return None
    mesh, dims = where

    def summed(values: Tensor) -> Tensor:
        for dim in dims:
            dist.all_reduce(values, group=mesh.get_group(dim))
        return values

    return summed


def whole_squares(squares: Tensor, wheres: list[Sharding]) -> Tensor:
    """Squared norms of shards (entry i of a tensor split as wheres[i]) as the whole
    tensors': summed over the shards with one all-reduce per device mesh."""
    meshes: dict[Any, list[int]] = {}
    for index, where in enumerate(wheres):
        if where is not None:
            meshes.setdefault(where, []).append(index)
    for where, indices in meshes.items():
        positions = torch.tensor(indices, device=squares.device)
        squares = squares.index_copy(0, positions, shard_sum(where)(squares[positions]))
    return squares
