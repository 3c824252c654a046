"""`torch.compile(opt.step)` of a Graft, as a user compiles torch.optim.Adam's: one graph and
no graph break on the eager path, the eager step's numbers, and a scheduler's next lr taken
without compiling the step again.

(`Graft(compile=True)`, the project's own fused step, is tests/test_compiled.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.optim.lr_scheduler import StepLR

from graft import Graft
from graft.optim.rules import variant_specs
from tests.helpers import SPECS, assert_trajectories_close, compute_grads, flat, make_model, train

pytestmark = pytest.mark.compile

STEPS = 3  # the first creates the state, the next two step on it, each at a new lr
PLAIN = {**SPECS, **variant_specs(compiled=True)}  # every rule, and every branch of its math
# What grafting adds to the rules' own steps: D's step counts traced too (Adam as D), and
# the ratio per tensor and over all tensors.
GRAFTED = [("adam", "sgd", "tensor"), ("sgd", "adam", "tensor"), ("adam", "sgd", "global")]


def make_graft(model, magnitude: dict, direction: dict | None, granularity="tensor") -> Graft:
    return Graft(model.parameters(), magnitude, direction, granularity=granularity)


def decaying_lr(optimizer) -> StepLR:
    return StepLR(optimizer, step_size=1, gamma=0.8)


def explained_training(model, optimizer, steps: int = STEPS):
    """Each step through Dynamo (`torch._dynamo.explain`, which runs the graphs it
    captures); the weights after each step, and each step's graph and break counts."""
    scheduler = decaying_lr(optimizer)
    trajectory, counts = [], []
    for step in range(steps):
        compute_grads(model, step)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(optimizer.step)()
        counts.append((explanation.graph_count, explanation.graph_break_count))
        scheduler.step()
        trajectory.append(flat(model))
    return trajectory, counts


def eager_training(model, optimizer, steps: int = STEPS):
    scheduler = decaying_lr(optimizer)
    return train(model, optimizer, steps, after_step=lambda step: scheduler.step())


def assert_traced_as_eager(magnitude, direction, granularity="tensor", dtype=torch.float64):
    model = make_model(dtype)
    traced, counts = explained_training(model, make_graft(model, magnitude, direction, granularity))
    assert counts == [(1, 0)] * STEPS, counts
    model = make_model(dtype)
    eager = eager_training(model, make_graft(model, magnitude, direction, granularity))
    assert_trajectories_close(traced, eager, dtype, start=flat(make_model(dtype)))


@pytest.mark.parametrize("name", PLAIN)
def test_each_rule_traces_in_one_graph_and_steps_as_eager(name):
    assert_traced_as_eager(PLAIN[name], None)


@pytest.mark.parametrize(("magnitude", "direction", "granularity"), GRAFTED)
def test_each_grafted_pair_traces_in_one_graph_and_steps_as_eager(
    magnitude, direction, granularity
):
    assert_traced_as_eager(SPECS[magnitude], SPECS[direction], granularity)


def test_fp32_weights_take_the_traced_fp64_coefficients():
    assert_traced_as_eager(SPECS["adam"], SPECS["sgd"], dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize(("magnitude", "direction"), [("sgd", None), ("adam", "sgd")])
def test_inductor_takes_a_new_lr_without_compiling_again(magnitude, direction):
    """torch.optim.SGD's compiled step recompiles at each new float lr (a float given to a
    foreach op is a constant of the graph); Graft's compiles twice in all: the first step
    (which creates the state) and the next, after which the lr is an input."""
    steps = 5
    spec_d = None if direction is None else SPECS[direction]
    model = make_model()
    optimizer = make_graft(model, SPECS[magnitude], spec_d)
    scheduler = decaying_lr(optimizer)
    torch._dynamo.reset()
    counters.clear()
    compiled_step = torch.compile(optimizer.step)
    compiled = []
    for step in range(steps):
        compute_grads(model, step)
        compiled_step()
        scheduler.step()
        compiled.append(flat(model))
    assert counters["stats"]["unique_graphs"] == 2

    model = make_model()
    eager = eager_training(model, make_graft(model, SPECS[magnitude], spec_d), steps)
    assert_trajectories_close(compiled, eager, torch.float32)


def test_the_black_box_path_steps_eagerly_under_torch_compile():
    """Any torch optimizer's pair (NAdam#SGD) under torch.compile(opt.step): the black-box
    step runs outside the graph (it swaps the tensors its optimizers step), bit for bit as
    eagerly, with no recompilation."""
    runs = []
    for compiled in (False, True):
        model = make_model(torch.float32)
        optimizer = Graft(model.parameters(), {"name": "torch.optim.NAdam"}, SPECS["sgd"])
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            optimizer.step = torch.compile(optimizer.step)
        runs.append(train(model, optimizer, STEPS))
    assert counters["stats"]["unique_graphs"] <= 1
    for eager, compiled in zip(*runs, strict=True):
        assert torch.equal(eager, compiled)
