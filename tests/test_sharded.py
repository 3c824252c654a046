"""Graft on FSDP2's sharded parameters (graft/optim/sharded.py), two gloo ranks against one
process: the same weights and per-tensor norms to 1e-10 in float64, for every pair of
built-in rules in both granularities, with one all-reduce per step."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import graft.optim.compiled as compiled
from graft import Graft
from graft.optim import GRANULARITIES, RULES, state_bytes

pytestmark = pytest.mark.distributed

SPECS = {name: {"name": name, **rule.setting} for name, rule in RULES.items()}
CASES = [(m, d, g) for m, d in itertools.product(SPECS, repeat=2) for g in GRANULARITIES]
STEPS = 10
# Rows that split unevenly over 2 ranks, a matrix of one row (rank 1's shard is empty), a
# conv kernel and vectors: LARS and LAMB treat 1-d tensors apart.
SHAPES = [(7, 5), (7,), (1, 4), (3, 2, 3, 3), (4,)]
WORLD = 2


def full_weights(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


# The black-box path (any torch optimizer): torch's own, and a built-in rule torch lacks.
BLACK_BOX_CASES = [
    ("adam", "sgd", "tensor"),
    ("torch.optim.NAdam", "adam", "global"),
    ("lamb", "sgd", "tensor"),
]


# compile=True on shards: the native loops (sgd, adam, adagrad), a graph (rmsprop), LARS.
COMPILED_CASES = [
    ("adam", "sgd", "tensor"),
    ("sgd", "adam", "global"),
    ("adagrad", "adam", "tensor"),
    ("rmsprop", "sgd", "global"),
    ("lars", "sgd", "tensor"),
]


def spec(name: str) -> dict:
    return SPECS.get(name, {"name": name, "lr": 1e-2})


def trajectory(case, mesh=None, dtype=torch.float64, **options) -> dict[str, torch.Tensor]:
    """Weights and both norms after each step of a case: on whole tensors, or with a mesh on
    DTensors sharded by rows over it (as fully_shard makes them)."""

    def made(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(dtype)
        return tensor if mesh is None else distribute_tensor(tensor, mesh, [Shard(0)])

    def whole(param: torch.Tensor) -> torch.Tensor:
        return param.detach() if mesh is None else param.full_tensor()

    magnitude, direction, granularity = case
    params = [torch.nn.Parameter(made(w)) for w in full_weights()]
    optimizer = Graft(params, spec(magnitude), spec(direction), granularity, **options)
    weights, norms = [], []
    for step in range(STEPS):
        for param, grad in zip(params, gradients(step)):
            param.grad = made(grad)
        optimizer.step()
        weights.append(torch.cat([whole(p).reshape(-1) for p in params]))
        norms.append(torch.stack([optimizer.last_norms.magnitude, optimizer.last_norms.direction]))
    compiled_steps = optimizer._compiled.steps if optimizer._compiled is not None else 0
    return {
        "weights": torch.stack(weights),
        "norms": torch.stack(norms),
        "compiled steps": compiled_steps,
    }


def on_rank(rank: int, folder: Path) -> None:
    """Every case on sharded parameters (rows of dim 0, as fully_shard makes them)."""
    store = f"file://{folder / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    reduces = {"count": 0}
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        reduces["count"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    results = {}
    for case in CASES:
        before = reduces["count"]
        results[case] = trajectory(case, mesh)
        results[case]["all_reduces"] = reduces["count"] - before
    for case in BLACK_BOX_CASES:
        results["black box", case] = trajectory(case, mesh, black_box=True)
    # fp32 shards: the inner optimizers step fp64 copies of them
    results["black box fp32"] = trajectory(BLACK_BOX_CASES[1], mesh, torch.float32)
    dist.all_reduce = all_reduce
    compiled.BACKEND = (
        "aot_eager"  # the graphs traced, not built in C++ (as tests/test_compiled.py)
    )
    for case in COMPILED_CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["compiled", case] = trajectory(case, mesh, compile=True)
        results["compiled", case]["warnings"] = [str(w.message) for w in caught]
    if rank == 0:
        torch.save(results, folder / "sharded.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_shards_equal_one_process_for_every_pair_with_one_all_reduce_per_step(tmp_path):
    """Every case in one pair of processes (starting them is most of the cost). LARS and
    LAMB add an all-reduce for each norm their own step takes (‖w‖, then ‖g‖ or ‖r‖: at
    most two each time the step runs, and D's runs twice, to advance and then to apply)."""
    mp.spawn(on_rank, args=(tmp_path,), nprocs=WORLD)
    found = torch.load(tmp_path / "sharded.pt")
    trust = {"lars", "lamb"}
    for case in CASES:
        expected = trajectory(case)
        assert_close_trajectories(found[case], expected, case)
        magnitude, direction, _ = case
        count = found[case]["all_reduces"]
        if magnitude not in trust and direction not in trust:
            assert count == STEPS, case
        else:
            extra = 2 * (magnitude in trust) + 4 * (direction in trust)
            assert STEPS < count <= STEPS * (1 + extra), case
    # compile=True: the native loops and the graphs step the shards after the first (eager)
    # step, as the eager sharded step does; LARS's and LAMB's graphs take whole tensors'
    # norms, so they step eagerly, said once.
    for case in COMPILED_CASES:
        compiled_run = found["compiled", case]
        if case[0] in trust or case[1] in trust:
            assert compiled_run["compiled steps"] == 0, case
            assert [w for w in compiled_run["warnings"] if "sharded" in w] == [
                compiled_run["warnings"][0]
            ], case
            assert torch.equal(compiled_run["weights"], found[case]["weights"]), case
        else:
            assert compiled_run["compiled steps"] == STEPS - 1, case
            assert compiled_run["warnings"] == [], case
            assert_close_trajectories(compiled_run, found[case], case, tolerance=1e-12)
    # The black-box path: torch's optimizers step the DTensors themselves, and Graft sums
    # the norms of their steps' shards.
    for case in BLACK_BOX_CASES:
        expected = trajectory(case, black_box=True)
        assert_close_trajectories(found["black box", case], expected, case)
    # In fp32 the shards' norms, summed in another order, may round a new weight the other
    # way: one ulp (6e-8 relative).
    expected = trajectory(BLACK_BOX_CASES[1], dtype=torch.float32)
    assert_close_trajectories(found["black box fp32"], expected, "fp32", tolerance=2e-7)


def assert_close_trajectories(found: dict, expected: dict, case, tolerance=1e-10) -> None:
    for key in ("weights", "norms"):
        scale = expected[key].abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        worst = ((found[key] - expected[key]).abs() / scale).max().item()
        assert worst <= tolerance, f"{case} {key}: {worst:.2e}"


def fully_sharded_on_rank(rank: int, folder: Path, case) -> None:
    """A model under fully_shard (per layer, then the root) trained by forward and backward."""
    store = f"file://{folder / 'rendezvous-model'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    model = small_model()
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=init_device_mesh("cpu", (WORLD,)))
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    weights, optimizer = train_small_model(model, case)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    states = [
        s for p in model.parameters() for side in optimizer.state[p].values() for s in side.items()
    ]
    kinds = {key: type(value).__name__ for key, value in states if key != "step"}
    held = torch.tensor(state_bytes(optimizer))
    dist.all_reduce(held)  # each rank counts its own shards
    if rank == 0:
        torch.save(
            {"weights": weights, "state kinds": kinds, "state bytes": int(held)},
            folder / "fully_sharded.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3)
    ).double()


def train_small_model(model: torch.nn.Module, case) -> tuple[torch.Tensor, Graft]:
    magnitude, direction, granularity = case
    optimizer = Graft(model.parameters(), SPECS[magnitude], SPECS[direction], granularity)
    for step in range(STEPS):
        inputs = torch.randn(
            8, 5, generator=torch.Generator().manual_seed(step), dtype=torch.float64
        )
        model.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    full = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    return torch.cat([w.reshape(-1) for w in full]), optimizer


@pytest.mark.parametrize("case", [("adam", "sgd", "tensor"), ("sgd", "adam", "global")])
def test_a_fully_sharded_model_trains_as_one_process_and_its_state_is_sharded(tmp_path, case):
    mp.spawn(fully_sharded_on_rank, args=(tmp_path, case), nprocs=WORLD)
    found = torch.load(tmp_path / "fully_sharded.pt")
    expected, optimizer = train_small_model(small_model(), case)
    assert ((found["weights"] - expected).abs().max() / expected.abs().max()).item() <= 1e-10
    # Both optimizers' states are DTensors like the parameters (what DCP saves by shard),
    # SGD's momentum buffer too, which it makes at its first step.
    assert set(found["state kinds"].values()) == {"DTensor"}
    assert "momentum_buffer" in found["state kinds"]
    # The ranks' shards of the state add up to one process's state, step counts apart
    # (one 0-d count per tensor and rank).
    counts = sum(
        side["step"].numel() * side["step"].element_size()
        for state in optimizer.state.values()
        for side in state.values()
        if "step" in side
    )
    assert found["state bytes"] == state_bytes(optimizer) + (WORLD - 1) * counts


def checkpoint_on_rank(rank: int, world: int, folder: Path, phase: str) -> None:
    """adam#sgd on a fully sharded model through torch.distributed.checkpoint: `save` steps
    3 times, saves, and steps 3 more; `load` builds anew, loads, and steps the same 3."""
    store = f"file://{folder / f'rendezvous-{phase}-{world}'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = small_model()
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = Graft(model.parameters(), SPECS["adam"], SPECS["sgd"])

    def step(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        model.zero_grad()
        model(
            torch.randn(8, 5, generator=generator, dtype=torch.float64)
        ).square().mean().backward()
        optimizer.step()

    if phase == "save":
        for index in range(3):
            step(index)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / "dcp")
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=folder / "dcp")
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    for index in range(3, 6):
        step(index)
    weights = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    if rank == 0:
        torch.save(weights, folder / f"{phase}-{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_a_sharded_checkpoint_resumes_bit_for_bit_and_loads_into_another_world_size(tmp_path):
    """Both optimizers' states go through torch.distributed.checkpoint by shard, with
    torch's own get_state_dict and set_state_dict."""
    mp.spawn(checkpoint_on_rank, args=(2, tmp_path, "save"), nprocs=2)
    mp.spawn(checkpoint_on_rank, args=(2, tmp_path, "load"), nprocs=2)
    mp.spawn(checkpoint_on_rank, args=(3, tmp_path, "load"), nprocs=3)
    uninterrupted = torch.load(tmp_path / "save-2.pt")
    assert torch.equal(torch.load(tmp_path / "load-2.pt"), uninterrupted)
    # Three ranks split the rows otherwise: the norms' sums run in another order.
    three = torch.load(tmp_path / "load-3.pt")
    assert ((three - uninterrupted).abs().max() / uninterrupted.abs().max()).item() <= 1e-12
