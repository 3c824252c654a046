"""Learning-rate schedules: their shapes, their checks, and that they scale Graft's step."""

from __future__ import annotations

import math

import pytest
import torch

from graft import Graft
from graft.train.schedules import build_schedule, lr_multiplier


def multipliers(name, max_steps=10, **options):
    return [lr_multiplier(s, name=name, max_steps=max_steps, **options) for s in range(max_steps)]


def test_warmup_is_linear_from_zero_then_hands_over():
    assert multipliers("constant", warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_step_decay_is_stepwise_exponential_after_warmup():
    values = multipliers("step_decay", warmup_steps=2, decay_rate=0.5, decay_every=3)
    assert values == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_step_decay_at_milestones():
    # Goyal et al. 2017's shape: warmup, then x0.1 at given steps (epochs 30, 60, 80).
    values = multipliers("step_decay", warmup_steps=2, decay_rate=0.1, milestones=[4, 7])
    assert values == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_linear_cosine_polynomial_end_points():
    linear = multipliers("linear", max_steps=11, warmup_steps=1)
    assert linear[1] == 1.0 and linear[6] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.1)
    cosine = multipliers("cosine", max_steps=5, final_ratio=0.2)
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 2 / 5))
    )
    assert multipliers("polynomial", max_steps=5, power=2.0)[2] == pytest.approx((1 - 2 / 5) ** 2)


def test_schedule_scales_the_grafted_step():
    param = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = Graft([param], {"name": "adam", "lr": 0.1}, {"name": "sgd", "lr": 1.0})
    scheduler = build_schedule(optimizer, "linear", max_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cyclic", {}, "unknown schedule 'cyclic'; allowed: constant, step_decay"),
        (
            "linear",
            {"warmup_steps": 20},
            "invalid schedule warmup_steps=20; allowed: an integer in [0, max_steps=10]",
        ),
        ("step_decay", {"decay_rate": 0.0}, "invalid schedule decay_rate=0.0; allowed: in (0, 1]"),
        ("cosine", {"final_ratio": 2.0}, "invalid schedule final_ratio=2.0"),
        ("constant", {"warmup": 3}, "unknown schedule option 'warmup'; allowed: decay_every"),
    ],
)
def test_bad_schedule_is_one_line_value_error(name, options, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match=None) as error:
        build_schedule(optimizer, name, max_steps=10, **options)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
