"""Graft(compile=True) on a GPU: one graph for the whole step (torch.compile of the eager
foreach step), run here on the CPU through the same compiler (`WHOLE_STEP_DEVICES` given
"cpu"): the eager step's weights, norms and state_dict for the paper's pairs, both
granularities, and rules without native loops; two compilations in all under a decaying
lr; an eager fallback with one warning where it cannot compile. On a CUDA machine, the
same against the CPU's eager step.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.optim.lr_scheduler import StepLR

import graft.optim.compiled as compiled
from graft import Graft
from graft.optim import GRANULARITIES
from tests.helpers import SPECS, assert_trajectories_close, compute_grads, flat, make_model

pytestmark = [pytest.mark.compile, pytest.mark.slow]

STEPS = 10
# The paper's nine pairs per tensor, three of them over all tensors too (each case compiles
# twice). Every rule's traced step, flags included: tests/test_torch_compile_step.py.
# GRAFT_ALL_PAIRS=1: every pair of built-in rules in both granularities (98 cases, minutes).
CASES = [
    *((m, d, "tensor") for m, d in itertools.product(("sgd", "adam", "adagrad"), repeat=2)),
    *((m, d, "global") for m, d in [("adam", "sgd"), ("sgd", "adam"), ("adagrad", "adam")]),
]
if os.environ.get("GRAFT_ALL_PAIRS") == "1":
    CASES = [(*pair, g) for pair in itertools.product(SPECS, repeat=2) for g in GRANULARITIES]


@pytest.fixture
def whole_on_cpu(monkeypatch):
    """CPU tensors take the whole-step graph, traced without generating C++ (AOT autograd,
    eager kernels): the functionalized graph, in a fraction of inductor's compile time."""
    monkeypatch.setattr(compiled, "WHOLE_STEP_DEVICES", ("cpu",))
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


@pytest.fixture
def inductor_on_cpu(monkeypatch):
    monkeypatch.setattr(compiled, "WHOLE_STEP_DEVICES", ("cpu",))


def scheduled_run(magnitude, direction, granularity, compile, device="cpu", steps=STEPS):
    """The weights after each step under a decaying lr, and the optimizer."""
    model = make_model().to(device)
    optimizer = Graft(model.parameters(), magnitude, direction, granularity, compile=compile)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.9)
    trajectory = []
    for step in range(steps):
        compute_grads(model, step)
        optimizer.step()
        scheduler.step()
        trajectory.append(flat(model).cpu())
    return trajectory, optimizer


def assert_whole_step_is_eager(magnitude, direction, granularity, device="cpu"):
    eager, eager_optimizer = scheduled_run(magnitude, direction, granularity, compile=False)
    whole, optimizer = scheduled_run(magnitude, direction, granularity, True, device)
    stepped = len(optimizer.last_norms.params)
    assert optimizer._compiled.failed is None
    assert optimizer._compiled.tensor_steps == {
        "native": 0,
        "graph": 0,
        "whole": stepped * (STEPS - 1),  # every step but the first, which creates the state
    }
    assert_trajectories_close(whole, eager, torch.float32)
    for side in ("magnitude", "direction"):
        torch.testing.assert_close(
            getattr(optimizer.last_norms, side).cpu(),
            getattr(eager_optimizer.last_norms, side),
            rtol=1e-5,
            atol=0,
        )
    state, eager_state = optimizer.state_dict(), eager_optimizer.state_dict()
    assert state["param_groups"] == eager_state["param_groups"]
    assert state["state"].keys() == eager_state["state"].keys()
    for index, roles in eager_state["state"].items():
        for role, tensors in roles.items():
            assert state["state"][index][role].keys() == tensors.keys()
            for key, expected in tensors.items():
                # Each state tensor to fp32 rounding of its own scale: RMSprop's momentum
                # sums g/√v terms, so a few ulps of its largest entry reach the small ones.
                torch.testing.assert_close(
                    state["state"][index][role][key].cpu(),
                    expected,
                    rtol=1e-5,
                    atol=1e-5 * expected.abs().max().item(),
                    msg=lambda text, where=(index, role, key): f"state {where}: {text}",
                )
    return optimizer


@pytest.mark.parametrize(("magnitude", "direction", "granularity"), CASES)
def test_the_whole_step_graph_is_the_eager_step(whole_on_cpu, magnitude, direction, granularity):
    assert_whole_step_is_eager(SPECS[magnitude], SPECS[direction], granularity)


@pytest.mark.parametrize(("magnitude", "direction"), [("lamb", "rmsprop"), ("lars", "adamw")])
def test_rules_without_native_loops_take_the_whole_step_too(whole_on_cpu, magnitude, direction):
    assert_whole_step_is_eager(SPECS[magnitude], SPECS[direction], "tensor")


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_inductor_compiles_the_whole_step_twice_whatever_the_lr(inductor_on_cpu, granularity):
    """Once at the second step (the first creates the state), once more when the lr first
    changes (it becomes an input of the graph); then never again."""
    torch._dynamo.reset()
    counters.clear()
    assert_whole_step_is_eager(SPECS["adam"], SPECS["sgd"], granularity)
    assert counters["stats"]["unique_graphs"] == 2


def test_a_whole_step_that_cannot_compile_warns_once_and_steps_eagerly(inductor_on_cpu):
    eager, _ = scheduled_run(SPECS["adam"], SPECS["sgd"], "tensor", compile=False)
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(
            {"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}
        ),
        pytest.warns(UserWarning, match="cannot compile the step here") as warned,
    ):
        fallen, optimizer = scheduled_run(SPECS["adam"], SPECS["sgd"], "tensor", compile=True)
    assert len([w for w in warned if "Graft(compile=True)" in str(w.message)]) == 1
    assert optimizer._compiled.failed is not None and optimizer._compiled.steps == 0
    assert_trajectories_close(fallen, eager, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), [("adam", "sgd"), ("sgd", "adam")])
def test_on_cuda_the_whole_step_is_the_cpu_eager_step(magnitude, direction, granularity):
    assert_whole_step_is_eager(SPECS[magnitude], SPECS[direction], granularity, device="cuda")
