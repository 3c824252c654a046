"""Graft on sharded parameters (FSDP2's DTensors): each rank steps its own shards, and the
norms are summed over the shards.

`torch.distributed.fsdp.fully_shard` turns each parameter into a DTensor whose local tensor
is this rank's shard (rows of dim 0). Both optimizers' states are made like the parameter
(DTensors sharded alike, which is what `torch.distributed.checkpoint` saves). Every rule's
step is pointwise but for its norms, so a rule stepped on the shards gives the shards of its
step; a norm needs the other ranks: ‖t‖² is the sum of the shards' ‖t_r‖². The step:

1. each chunk: M's and D's steps advance their states and give their updates' squared norms
   on this rank's shards (the updates themselves are dropped);
2. one all-reduce of every tensor's squared ‖u_M‖ and ‖u_D‖ together (one per device mesh)
   gives every rank the exact norms;
3. each chunk: D's update is computed again from its advanced state (`advance=False`, as
   the global granularity's second pass does) and added with the ratio.

LARS and LAMB take norms inside their step (‖w‖, ‖g‖ or ‖r‖ for the trust ratio): each of
their steps on a sharded chunk adds one all-reduce (`update.summed_over_shards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from graft.optim import spec as specs
from graft.optim.combine import grafting_ratio
from graft.optim.rules.base import traced_lr
from graft.optim.shards import Sharding, local, shard_sum, sharding, whole_squares
from graft.optim.update import StepNorms, apply_update, summed_over_shards, update_norms


@dataclass
class Chunk:
    group: dict[str, Any]
    params: list[Tensor]  # the DTensors (or plain tensors), as the caller holds them
    shards: list[Tensor]  # their local tensors
    grads: list[Tensor]
    d_states: list[dict[str, Tensor]]
    where: Sharding


def local_states(states: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Each state with its tensors' shards: the rules update the shards in place."""
    return [{key: local(value) for key, value in state.items()} for state in states]


def keep_new_state(
    params: list[Tensor], states: list[dict[str, Tensor]], shards: list[dict[str, Tensor]]
) -> None:
    """State a rule made at its first step (SGD's momentum buffer, started at g) is a shard:
    kept as a DTensor sharded like its parameter, as the rest of the state is."""
    for param, state, shard in zip(params, states, shards, strict=True):
        for key, value in shard.items():
            if key in state or not isinstance(param, DTensor):
                continue
            state[key] = DTensor.from_local(
                value,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )


def sharded_step(graft: Any) -> StepNorms:
    """Graft's step on the local shards, with norms exact over all shards (module docstring)."""
    grafting = graft.grafting()
    chunks: list[Chunk] = []
    norm_params: list[Tensor] = []
    m_squares: list[Tensor] = []  # per chunk, on this rank's shards
    d_squares: list[Tensor] = []
    for group in graft.param_groups:
        m_rule = specs.rule_of(group["magnitude"])
        m_hyper = {**group["magnitude"], "lr": traced_lr(group["lr"])}
        for params in graft._chunks(group):
            where = sharding(params[0])
            shards = [local(p) for p in params]
            grads = [local(p.grad) for p in params]
            m_states = graft._states(params, "magnitude", m_rule, m_hyper)
            m_shards = local_states(m_states)
            with summed_over_shards(shard_sum(where)):
                update = m_rule.step(shards, grads, m_shards, m_hyper, advance=True)
            keep_new_state(params, m_states, m_shards)
            m_squares.append(update_norms(update).square())
            norm_params += params
            if not grafting:
                apply_update(shards, update)
                continue
            del update  # only its norm is needed: D's direction is what is added
            d_rule = specs.rule_of(group["direction"])
            d_states = graft._states(params, "direction", d_rule, group["direction"])
            d_shards = local_states(d_states)
            with summed_over_shards(shard_sum(where)):
                update = d_rule.step(shards, grads, d_shards, group["direction"], advance=True)
            keep_new_state(params, d_states, d_shards)
            d_squares.append(update_norms(update).square())
            del update
            chunks.append(Chunk(group, params, shards, grads, d_shards, where))

    if not norm_params:
        return StepNorms([], torch.zeros(0), torch.zeros(0))
    wheres = [sharding(param) for param in norm_params]
    if not grafting:
        norms = whole_squares(torch.cat(m_squares), wheres).sqrt()
        return StepNorms(norm_params, norms, norms)
    both = whole_squares(torch.cat(m_squares + d_squares), wheres * 2).sqrt()
    magnitude, direction = both.chunk(2)
    if graft.granularity == "global":
        total_m, total_d = magnitude.square().sum().sqrt(), direction.square().sum().sqrt()
    start = 0
    for chunk in chunks:
        end = start + len(chunk.params)
        d_rule = specs.rule_of(chunk.group["direction"])
        with summed_over_shards(shard_sum(chunk.where)):
            update = d_rule.step(
                chunk.shards, chunk.grads, chunk.d_states, chunk.group["direction"], advance=False
            )
        eps = chunk.group["eps"]
        if graft.granularity == "tensor":
            scales = list(grafting_ratio(magnitude[start:end], direction[start:end], eps).unbind())
        else:
            scales = [grafting_ratio(total_m, total_d, eps)] * len(chunk.params)
        apply_update(chunk.shards, update, scales)
        del update
        start = end
    return StepNorms(norm_params, magnitude, direction)
