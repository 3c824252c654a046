"""Graft behaves as a torch.optim optimizer does where torch's own tools rely on it.

Checked against torch.optim.Adam / SGD in the same situations: momentum-cycling schedulers
(OneCycleLR, CyclicLR: they cycle M's momentum or β1), deepcopy and pickling (a copy steps
bit for bit as the original), param-group keys Graft does not know (kept, as torch keeps
them), specs given as classes (a state_dict that `torch.load(weights_only=True)` reads),
the global step hooks (once per step, on every path), a group's weight_decay (the pair's,
read and written as torch's), and torch's constructor keywords
(`maximize` flips the gradient both optimizers see; the others' one-line refusals).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from graft import Graft
from tests.helpers import SPECS, assert_trajectories_close, compute_grads, flat, make_model, train

STEPS = 10
NADAM = {"name": "torch.optim.NAdam", "lr": 2e-3}


def torch_twin(params, spec: dict) -> torch.optim.Optimizer:
    """The torch.optim optimizer a built-in spec computes."""
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[spec["name"]]
    return cls(params, **{key: value for key, value in spec.items() if key != "name"})


SCHEDULERS = {
    "one_cycle": lambda optimizer: lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=STEPS
    ),
    "cyclic": lambda optimizer: lr_scheduler.CyclicLR(
        optimizer, base_lr=0.001, max_lr=0.05, step_size_up=3
    ),
}


def scheduled(model, optimizer, scheduler_name: str, steps: int = STEPS):
    """Train under the scheduler (its defaults: cycle_momentum=True); the trajectory and
    the momentum the scheduler set before each step."""
    scheduler = SCHEDULERS[scheduler_name](optimizer)
    set_before = []

    def before_next(step: int) -> None:
        scheduler.step()
        group = optimizer.param_groups[0]
        set_before.append(group["betas"][0] if "betas" in group else group["momentum"])

    first = optimizer.param_groups[0]
    set_before.append(first["betas"][0] if "betas" in first else first["momentum"])
    return train(model, optimizer, steps, after_step=before_next), set_before[:steps]


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_momentum_cycling_schedulers_step_plain_m_as_torch(scheduler_name, name):
    dtype = torch.float64
    model = make_model(dtype)
    reference, torch_momenta = scheduled(
        model, torch_twin(model.parameters(), SPECS[name]), scheduler_name
    )
    model = make_model(dtype)
    optimizer = Graft(model.parameters(), SPECS[name])
    trajectory, momenta = scheduled(model, optimizer, scheduler_name)
    assert momenta == torch_momenta
    assert len(set(momenta)) > 2  # the scheduler did cycle it
    assert_trajectories_close(trajectory, reference, dtype, start=flat(make_model(dtype)))


@pytest.mark.parametrize(
    ("magnitude", "direction"), [("adam", "sgd"), ("sgd", "adam"), ("lars", "adam")]
)
def test_momentum_cycling_cycles_m_and_leaves_d(magnitude, direction):
    """A grafted pair: the scheduler's momentum is M's (as lr is), on the eager and the
    black-box path alike; D's stays as given."""
    dtype = torch.float64
    runs = []
    for black_box in (False, True):
        model = make_model(dtype)
        optimizer = Graft(
            model.parameters(), SPECS[magnitude], SPECS[direction], black_box=black_box
        )
        runs.append(scheduled(model, optimizer, "one_cycle")[0])
        assert optimizer.param_groups[0]["direction"] == optimizer.defaults["direction"]
    assert_trajectories_close(runs[1], runs[0], dtype)

    # The momentum M ran at each step is the one the scheduler had set before it.
    model = make_model(dtype)
    optimizer = Graft(model.parameters(), SPECS[magnitude], SPECS[direction])
    scheduler = SCHEDULERS["one_cycle"](optimizer)
    key = optimizer.momentum_key
    for step in range(STEPS):
        group = optimizer.param_groups[0]
        expected = group[key]
        compute_grads(model, step)
        optimizer.step()
        assert group["magnitude"][key] == expected
        scheduler.step()

    # Without cycling the same run differs: the cycled momentum took effect.
    model = make_model(dtype)
    optimizer = Graft(model.parameters(), SPECS[magnitude], SPECS[direction])
    scheduler = lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=STEPS, cycle_momentum=False
    )
    still = train(model, optimizer, STEPS, after_step=lambda step: scheduler.step())
    assert not torch.allclose(still[-1], runs[0][-1], rtol=1e-6)


# Graft's paths (the black-box one with a torch class, and with a built-in rule torch.optim
# lacks: a nested Graft), each as Graft's keywords.
PATHS = {
    "eager": dict(magnitude=SPECS["adam"], direction=SPECS["sgd"]),
    "global": dict(magnitude=SPECS["adam"], direction=SPECS["sgd"], granularity="global"),
    "lars_direction": dict(magnitude=SPECS["adam"], direction=SPECS["lars"]),
    "black_box": dict(magnitude=NADAM, direction=SPECS["sgd"]),
    "black_box_fp32_copies": dict(magnitude=NADAM, direction=SPECS["sgd"], black_box_fp64=False),
    "black_box_nested": dict(magnitude=SPECS["lars"], direction=SPECS["adam"], black_box=True),
    "compiled": dict(magnitude=SPECS["adam"], direction=SPECS["sgd"], compile=True),
}


def paths(*names: str) -> list:
    """PATHS' names as test parameters, the compiled one marked (it compiles a step)."""
    return [
        pytest.param(name, marks=pytest.mark.compile) if name == "compiled" else name
        for name in names or PATHS
    ]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("path", paths())
def test_a_copy_steps_as_the_original(path, how):
    """A copy made after 3 steps takes the next 3 bit for bit as the original does."""
    model = make_model()
    optimizer = Graft(model.parameters(), **PATHS[path])
    train(model, optimizer, 3)
    pair = (model, optimizer)  # together, so the copy's groups hold the copy's parameters
    twin, twin_optimizer = (
        copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    )
    assert twin_optimizer.black_box == optimizer.black_box
    assert twin_optimizer.black_box_fp64 == optimizer.black_box_fp64
    assert twin_optimizer.last_norms is not None
    for original, copied in zip(
        train(model, optimizer, 3, offset=3), train(twin, twin_optimizer, 3, offset=3), strict=True
    ):
        assert torch.equal(original, copied)
    if path == "compiled":
        assert twin_optimizer._compiled.steps == 3


def test_unknown_group_keys_are_kept_and_reach_no_optimizer():
    model = make_model()
    tags = {"name": "encoder", "initial_lr": 0.004, "owner": {"team": "vision"}}
    optimizer = Graft([{"params": model.parameters(), **tags}], SPECS["adam"], SPECS["sgd"])
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in tags} == tags
    assert group["magnitude"] == optimizer.defaults["magnitude"]
    assert group["direction"] == optimizer.defaults["direction"]
    trajectory = train(model, optimizer, 3)

    plain = make_model()
    assert torch.equal(
        trajectory[-1], train(plain, Graft(plain.parameters(), SPECS["adam"], SPECS["sgd"]), 3)[-1]
    )

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = Graft(make_model().parameters(), SPECS["adam"], SPECS["sgd"])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert {key: resumed.param_groups[0][key] for key in tags} == tags


def test_a_kwargs_optimizer_gets_only_the_keywords_it_names():
    """A class taking **kwargs would take any key; tags stay with the group all the same."""
    model = make_model()
    group = {"params": model.parameters(), "name": "all", "initial_lr": 0.1, "momentum": 0.5}
    optimizer = Graft([group], {"name": KwargsSGD, "lr": 0.1}, SPECS["adam"])
    assert optimizer.param_groups[0]["magnitude"] == {
        "name": f"{__name__}.KwargsSGD",
        "momentum": 0.5,
    }
    train(model, optimizer, 2)
    assert optimizer.param_groups[0]["name"] == "all"


class KwargsSGD(torch.optim.SGD):
    """SGD that takes (and ignores) any other keyword, as some optimizer zoos do."""

    def __init__(self, params, lr=0.1, momentum=0.0, **ignored):
        super().__init__(params, lr=lr, momentum=momentum)


def test_a_scheduler_resumes_from_initial_lr_given_in_the_group():
    """last_epoch != -1 reads each group's initial_lr, as for torch.optim.Adam."""
    lrs = []
    for make in (
        lambda groups: torch.optim.Adam(groups, lr=1e-3),
        lambda groups: Graft(groups, {"name": "adam", "lr": 1e-3}, SPECS["sgd"]),
    ):
        model = make_model()
        optimizer = make([{"params": model.parameters(), "initial_lr": 0.01}])
        scheduler = lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5, last_epoch=2)
        seen = []
        for step in range(3):
            compute_grads(model, step)
            optimizer.step()
            scheduler.step()
            seen.append(optimizer.param_groups[0]["lr"])
        lrs.append(seen)
    assert lrs[0] == lrs[1]


def decay_scheduled(model, optimizer, steps: int = STEPS) -> list[torch.Tensor]:
    """Train while writing each group's weight_decay before every step but the first, as
    DINO's and MAE's weight-decay schedules do."""

    def before_next(step: int) -> None:
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.05 * (step + 2)

    return train(model, optimizer, steps, after_step=before_next)


@pytest.mark.parametrize("black_box", [False, True])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_weight_decay_schedule_steps_plain_m_as_torch(name, black_box):
    dtype = torch.float64
    spec = {**SPECS[name], "weight_decay": 0.05}
    model = make_model(dtype)
    reference = decay_scheduled(model, torch_twin(model.parameters(), spec))
    model = make_model(dtype)
    optimizer = Graft(model.parameters(), spec, black_box=black_box)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    trajectory = decay_scheduled(model, optimizer)
    assert_trajectories_close(trajectory, reference, dtype, start=flat(make_model(dtype)))
    model = make_model(dtype)
    constant = train(model, Graft(model.parameters(), spec, black_box=black_box), STEPS)
    assert not torch.allclose(constant[-1], trajectory[-1], rtol=1e-9)  # the schedule acted


@pytest.mark.parametrize("path", paths())
def test_a_groups_weight_decay_is_the_pairs_and_sets_both(path):
    """The key a group was made with reads back from it; a value written there later
    steps as a group made with that value, on every path."""
    runs = []
    for written in (None, 0.2):
        model = make_model()
        groups = [{"params": model.parameters(), "weight_decay": 0.2 if written is None else 0.01}]
        optimizer = Graft(groups, **PATHS[path])
        group = optimizer.param_groups[0]
        assert group["weight_decay"] == (0.2 if written is None else 0.01)
        if written is not None:
            group["weight_decay"] = written
        runs.append(train(model, optimizer, 3))
        assert group["magnitude"]["weight_decay"] == group["direction"]["weight_decay"] == 0.2
    assert_trajectories_close(runs[1], runs[0], torch.float32)


def test_a_group_has_a_weight_decay_only_where_m_and_d_run_one():
    params = make_model().parameters
    apart = Graft(params(), {**SPECS["adam"], "weight_decay": 0.1}, SPECS["sgd"])
    assert "weight_decay" not in apart.param_groups[0]  # SGD's is 0: no one value to show
    lone = Graft(params(), {**SPECS["adam"], "weight_decay": 0.1}, {"name": "torch.optim.Rprop"})
    assert lone.param_groups[0]["weight_decay"] == 0.1  # Rprop takes none
    assert "weight_decay" not in lone.param_groups[0]["direction"]
    overridden = Graft(
        [{"params": params(), "direction": {"weight_decay": 0.3}}],
        {**SPECS["adam"], "weight_decay": 0.3},
        SPECS["sgd"],
    )
    assert overridden.param_groups[0]["weight_decay"] == 0.3

    restored = Graft(
        params(), {**SPECS["adam"], "weight_decay": 0.1}, {"name": "torch.optim.Rprop"}
    )
    state = lone.state_dict()
    state["param_groups"][0].pop("weight_decay")  # saved before groups showed it
    restored.load_state_dict(state)
    assert restored.param_groups[0]["weight_decay"] == 0.1


def test_a_class_spec_is_stored_as_a_path_that_loads_with_weights_only():
    model = make_model()
    spec = {"name": torch.optim.NAdam, "lr": 2e-3}
    optimizer = Graft(model.parameters(), spec, SPECS["sgd"])
    assert optimizer.param_groups[0]["magnitude"]["name"] == "torch.optim.NAdam"
    train(model, optimizer, 2)

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    resumed = Graft(twin.parameters(), spec, SPECS["sgd"])
    resumed.load_state_dict(saved)
    for original, copied in zip(
        train(model, optimizer, 2, offset=2), train(twin, resumed, 2, offset=2), strict=True
    ):
        assert torch.equal(original, copied)


def test_a_group_override_may_name_the_class_again():
    model = make_model()
    override = {"name": torch.optim.NAdam, "weight_decay": 0.01}
    group = {"params": model.parameters(), "magnitude": override}
    optimizer = Graft([group], {"name": torch.optim.NAdam, "lr": 2e-3}, SPECS["sgd"])
    magnitude = optimizer.param_groups[0]["magnitude"]
    assert magnitude["name"] == "torch.optim.NAdam"
    assert magnitude["weight_decay"] == 0.01


def test_a_class_defined_in_a_function_stays_a_class():
    """No path imports it back: it works in this process, as before."""

    class LocalSGD(torch.optim.SGD):
        pass

    model = make_model()
    optimizer = Graft(model.parameters(), {"name": LocalSGD, "lr": 0.1}, SPECS["adam"])
    assert optimizer.param_groups[0]["magnitude"]["name"] is LocalSGD
    train(model, optimizer, 1)


@pytest.mark.parametrize("path", paths("eager", "black_box", "black_box_nested"))
def test_global_step_hooks_fire_once_per_step_for_the_graft(path):
    model = make_model()
    optimizer = Graft(model.parameters(), **PATHS[path])
    seen = {"pre": [], "post": []}
    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen["pre"].append(opt)),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: seen["post"].append(opt)),
    ]
    try:
        train(model, optimizer, 3)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"pre": [optimizer] * 3, "post": [optimizer] * 3}


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_maximize_steps_plain_m_as_torch(name):
    """Per group, as torch takes it: one group maximizes, the other minimizes."""
    dtype = torch.float64
    runs = []
    for make in (torch_twin, Graft):
        model = make_model(dtype)
        params = list(model.parameters())
        groups = [{"params": params[:3], "maximize": True}, {"params": params[3:]}]
        runs.append(train(model, make(groups, SPECS[name]), STEPS))
    assert_trajectories_close(runs[1], runs[0], dtype, start=flat(make_model(dtype)))


@pytest.mark.parametrize("path", paths())
def test_grafted_maximize_is_minimizing_the_negated_loss(path):
    """M and D both see -g: bit for bit the step on -loss, whether or not an optimizer
    takes a maximize keyword of its own (LARS does not), on every path."""
    keywords = PATHS[path]
    maximizing, minimizing = make_model(), make_model()
    up = Graft(maximizing.parameters(), **keywords, maximize=True)
    down = Graft(minimizing.parameters(), **keywords)
    for step in range(4):
        compute_grads(maximizing, step)
        grads = [param.grad.clone() for param in maximizing.parameters()]
        for param, grad in zip(minimizing.parameters(), grads, strict=True):
            param.grad = -grad  # the gradient of -loss
        up.step()
        down.step()
        assert torch.equal(flat(maximizing), flat(minimizing))
        for param, grad in zip(maximizing.parameters(), grads, strict=True):
            assert torch.equal(param.grad, grad)  # the gradients are left as they were


@pytest.mark.parametrize(
    "keywords",
    [
        {"foreach": None},
        {"foreach": True},
        {"fused": None},
        {"fused": False},
        {"capturable": False},
        {"differentiable": False},
    ],
    ids=str,
)
def test_torch_keywords_that_describe_the_step_change_nothing(keywords):
    model, plain = make_model(), make_model()
    stepped = train(model, Graft(model.parameters(), SPECS["adam"], SPECS["sgd"], **keywords), 2)
    expected = train(plain, Graft(plain.parameters(), SPECS["adam"], SPECS["sgd"]), 2)
    assert torch.equal(stepped[-1], expected[-1])


@pytest.mark.parametrize(
    ("keywords", "bad"),
    [
        ({"foreach": False}, "foreach=False"),
        ({"fused": True}, "fused=True"),
        ({"capturable": True}, "capturable=True"),
        ({"differentiable": True}, "differentiable=True"),
        ({"maximize": 1}, "maximize=1"),
        ({"black_box_fp64": "yes"}, "black_box_fp64='yes'"),
    ],
    ids=str,
)
def test_torch_keywords_graft_cannot_honour_are_one_line_value_errors(keywords, bad):
    with pytest.raises(ValueError) as error:
        Graft(make_model().parameters(), SPECS["adam"], **keywords)
    message = str(error.value)
    assert "\n" not in message
    assert f"invalid {bad} for Graft; allowed: " in message
