"""The grafted step itself: eager path == black-box path for every pair, a closed form,
invariances."""

from __future__ import annotations

import itertools

import pytest
import torch

from graft import Graft
from tests.helpers import SPECS, assert_trajectories_close, compute_grads, flat, make_model, train

STEPS = 5
# Each rule as the paper (or its authors) run it (`Rule.setting`).
PAIRS = list(itertools.product(SPECS, SPECS))


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), PAIRS)
def test_eager_equals_black_box_fp64(magnitude, direction, granularity):
    trajectories = []
    for black_box in (False, True):
        model = make_model(torch.float64)
        start = flat(model)
        optimizer = Graft(
            model.parameters(),
            SPECS[magnitude],
            SPECS[direction],
            granularity=granularity,
            black_box=black_box,
        )
        trajectories.append(train(model, optimizer, STEPS))
    assert_trajectories_close(*trajectories, torch.float64, start=start)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), [("adam", "sgd"), ("sgd", "adam")])
def test_eager_equals_black_box_fp32(magnitude, direction, granularity):
    """In fp32 the black box measures u = w' - w to within an ulp of w, so it is the
    reference only to that precision."""
    trajectories = []
    for black_box in (False, True):
        model = make_model(torch.float32)
        optimizer = Graft(
            model.parameters(), SPECS[magnitude], SPECS[direction], granularity, black_box=black_box
        )
        trajectories.append(train(model, optimizer, STEPS))
    assert_trajectories_close(*trajectories, torch.float32, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_first_step_of_adam_sgd_has_closed_form(granularity):
    """Step 1: u_SGD = -lr·g and u_Adam = -lr_A·g/(|g| + eps), so Adam#SGD moves each
    tensor (or the whole model) by -lr_A·‖g/(|g|+eps)‖ · g/‖g‖."""
    model = make_model(torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    lr, eps = 1e-3, 1e-8
    optimizer = Graft(
        model.parameters(),
        {"name": "adam", "lr": lr, "eps": eps},
        {"name": "sgd", "lr": 0.7, "momentum": 0.9},
        granularity=granularity,
    )
    compute_grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()

    adam = [g / (g.abs() + eps) for g in grads]
    if granularity == "tensor":
        expected = [-lr * a.norm() * g / g.norm() for a, g in zip(adam, grads)]
    else:
        total = torch.cat([a.reshape(-1) for a in adam]).norm()
        grad_norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        expected = [-lr * total * g / grad_norm for g in grads]
    for param, weight, step in zip(model.parameters(), start, expected):
        torch.testing.assert_close(param.detach() - weight, step, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("black_box", [False, True])
@pytest.mark.parametrize(("magnitude", "direction"), PAIRS[::4])
def test_each_tensor_moves_by_magnitude_norm(magnitude, direction, black_box):
    """Layer-wise grafting's contract: every tensor's step has exactly ‖u_M‖ as norm
    (and last_norms reports it)."""
    model = make_model(torch.float64)
    optimizer = Graft(model.parameters(), SPECS[magnitude], SPECS[direction], black_box=black_box)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        compute_grads(model, step)
        optimizer.step()
        moved = torch.stack([(p.detach() - w).norm() for p, w in zip(model.parameters(), before)])
        norms = optimizer.last_norms
        assert [id(p) for p in norms.params] == [id(p) for p in model.parameters()]
        torch.testing.assert_close(moved, norms.magnitude, rtol=1e-9, atol=1e-18)


def test_global_granularity_uses_one_ratio():
    model = make_model(torch.float64)
    optimizer = Graft(model.parameters(), SPECS["adam"], SPECS["sgd"], granularity="global")
    train(model, optimizer, 2)
    before = [p.detach().clone() for p in model.parameters()]
    compute_grads(model, 2)
    optimizer.step()
    norms = optimizer.last_norms
    ratio = norms.magnitude.norm() / norms.direction.norm()
    moved = torch.stack([(p.detach() - w).norm() for p, w in zip(model.parameters(), before)])
    torch.testing.assert_close(moved, ratio * norms.direction, rtol=1e-9, atol=1e-18)
    # ...so the whole model moves by exactly ‖u_M‖ over all tensors.
    torch.testing.assert_close(moved.norm(), norms.magnitude.norm(), rtol=1e-12, atol=0)


def test_global_on_one_tensor_equals_tensor_granularity():
    trajectories = []
    for granularity in ("tensor", "global"):
        weight = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4))
        optimizer = Graft([weight], SPECS["lamb"], SPECS["adagrad"], granularity=granularity)
        steps = []
        for step in range(4):
            weight.grad = torch.sin(weight.detach() * (step + 1)) + 0.1
            optimizer.step()
            steps.append(weight.detach().clone())
        trajectories.append(steps)
    assert_trajectories_close(*trajectories, torch.float64)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(
    ("name", "reference"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)]
)
def test_direction_lr_cancels(name, reference, granularity):
    """SGD(lr)#SGD(k·lr) == SGD(lr) and Adam(lr)#Adam(k·lr) == Adam(lr)."""
    keywords = {"lr": 0.05, "momentum": 0.9} if name == "sgd" else {"lr": 0.01}
    model = make_model(torch.float64)
    expected = train(model, reference(model.parameters(), **keywords), STEPS)
    for k in (0.01, 7.0):
        model = make_model(torch.float64)
        start = flat(model)
        magnitude = {"name": name, **keywords}
        direction = {**magnitude, "lr": k * keywords["lr"]}
        optimizer = Graft(model.parameters(), magnitude, direction, granularity)
        assert optimizer.grafting()
        actual = train(model, optimizer, STEPS)
        assert_trajectories_close(actual, expected, torch.float64, start=start)


@pytest.mark.parametrize("black_box", [False, True])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_scheduler_halving_lr_halves_the_step(granularity, black_box):
    steps = []
    for halve in (False, True):
        model = make_model(torch.float64)
        optimizer = Graft(
            model.parameters(), SPECS["adam"], SPECS["sgd"], granularity, black_box=black_box
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        train(model, optimizer, 2)
        if halve:
            scheduler.step()
            assert optimizer.param_groups[0]["lr"] == SPECS["adam"]["lr"] / 2
        before = flat(model)
        compute_grads(model, 2)
        optimizer.step()
        steps.append(flat(model) - before)
    torch.testing.assert_close(steps[1], steps[0] / 2, rtol=1e-9, atol=1e-18)


def test_any_torch_optimizer_by_dotted_name():
    """NAdam (not a built-in rule) as M: plain, it is torch's NAdam; grafted onto SGD's
    direction, step 1 is -g/‖g‖ scaled to NAdam's step norm, per tensor."""
    nadam = {"name": "torch.optim.NAdam", "lr": 2e-3}
    model = make_model(torch.float64)
    expected = train(model, torch.optim.NAdam(model.parameters(), lr=2e-3), STEPS)
    model = make_model(torch.float64)
    optimizer = Graft(model.parameters(), nadam)
    assert optimizer.black_box
    assert_trajectories_close(train(model, optimizer, STEPS), expected, torch.float64)

    model = make_model(torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = Graft(model.parameters(), nadam, {"name": "sgd", "lr": 0.3, "momentum": 0.9})
    compute_grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    reference = make_model(torch.float64)
    train(reference, torch.optim.NAdam(reference.parameters(), lr=2e-3), 1)
    for param, weight, grad, nadam_weight in zip(
        model.parameters(), start, grads, reference.parameters()
    ):
        nadam_norm = (nadam_weight.detach() - weight).norm()
        expected_step = -nadam_norm * grad / grad.norm()
        torch.testing.assert_close(param.detach() - weight, expected_step, rtol=1e-9, atol=1e-18)


def test_user_optimizer_class_is_accepted():
    class HalfSGD(torch.optim.SGD):
        """A user's own optimizer: SGD at half the learning rate."""

        def __init__(self, params, lr=0.1):
            super().__init__(params, lr=lr / 2)

    model = make_model(torch.float64)
    optimizer = Graft(model.parameters(), {"name": HalfSGD, "lr": 0.2}, SPECS["adam"])
    train(model, optimizer, 2)
    assert torch.isfinite(flat(model)).all()
