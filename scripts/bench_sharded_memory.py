"""Per-rank memory of M#D under DDP against FSDP2: weights and both optimizers' states.

DDP keeps a whole copy of the weights and of M's and D's states on every rank; FSDP2
(`fully_shard` per block, then the root) keeps each rank's shards of them. The figures are
what each rank holds after one Graft step (`graft.optim.state_bytes`, which counts a
DTensor's local shard), measured on gloo ranks on the CPU: bytes do not depend on the
device. Gradients are left out: both keep them alike (DDP whole, FSDP2 sharded).

    python scripts/bench_sharded_memory.py [--ranks 2 4] [--models resnet50 bert-base]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from graft import Graft
from graft.optim import state_bytes

PAIRS = {
    "adam#sgd": ({"name": "adam", "lr": 1e-3}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    "sgd#adam": ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "adam", "lr": 1e-3}),
    "adagrad#adam": ({"name": "adagrad", "lr": 0.1}, {"name": "adam", "lr": 1e-3}),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[type, ...]]:
    """The model and the blocks each sharded on their own (as the trainer's fsdp mode)."""
    if name == "resnet50":
        import torchvision
        from torchvision.models.resnet import Bottleneck

        return torchvision.models.resnet50(), (Bottleneck,)
    from transformers import BertConfig, BertForMaskedLM
    from transformers.models.bert.modeling_bert import BertLayer

    return BertForMaskedLM(BertConfig()), (BertLayer,)


def held_bytes(model: torch.nn.Module, optimizer: Graft) -> tuple[int, int]:
    """(weights, optimizer state) bytes this rank holds."""
    weights = 0
    for param in model.parameters():
        shard = param._local_tensor if isinstance(param, DTensor) else param
        weights += shard.numel() * shard.element_size()
    return weights, state_bytes(optimizer)


def one_step(model: torch.nn.Module, pair: str) -> Graft:
    optimizer = Graft(model.parameters(), *PAIRS[pair])
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    return optimizer


def on_rank(rank: int, world: int, folder: Path, models: list[str]) -> None:
    store = f"file://{folder / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = {}
    for name in models:
        for pair in PAIRS:
            model, blocks = build(name)
            for module in model.modules():
                if isinstance(module, blocks):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            held = torch.tensor(held_bytes(model, one_step(model, pair)))
            dist.all_reduce(held, op=dist.ReduceOp.MAX)  # the rank that holds the most
            rows[name, pair] = held.tolist()
    if rank == 0:
        torch.save(rows, folder / "fsdp.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert-base"])
    args = parser.parse_args()
    mib = 2**20
    whole = {}
    for name in args.models:  # DDP: every rank holds what one process holds
        for pair in PAIRS:
            model, _ = build(name)
            whole[name, pair] = held_bytes(model, one_step(model, pair))
    print(f"torch {torch.__version__}; MiB per rank after one step (weights + M's and D's state)")
    print("| model | M#D | ranks | DDP: weights + state | FSDP2: weights + state | FSDP2 / DDP |")
    print("|---|---|---|---|---|---|")
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(on_rank, args=(world, Path(folder), args.models), nprocs=world)
            sharded = torch.load(Path(folder) / "fsdp.pt")
        for (name, pair), (weights, state) in sharded.items():
            ddp_weights, ddp_state = whole[name, pair]
            print(
                f"| {name} | {pair} | {world} | {ddp_weights / mib:.0f} + {ddp_state / mib:.0f} "
                f"| {weights / mib:.0f} + {state / mib:.0f} "
                f"| {(weights + state) / (ddp_weights + ddp_state):.3f} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
