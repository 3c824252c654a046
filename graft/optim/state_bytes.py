"""How much memory an optimizer keeps between steps."""

from __future__ import annotations

from typing import Any

import torch

from graft.optim.shards import local


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (nested dicts included)
    that this process holds: of a sharded (DTensor) state, this rank's shard."""
    return sum(_tensor_bytes(state) for state in optimizer.state.values())


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        held = local(value)
        return held.numel() * held.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0
