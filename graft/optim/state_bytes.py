"""How much memory an optimizer keeps between steps."""

from __future__ import annotations

from typing import Any

import torch


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (nested dicts included)."""
    return sum(_tensor_bytes(state) for state in optimizer.state.values())


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0
