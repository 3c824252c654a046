"""Each built-in rule, alone and grafted onto itself, equals its torch.optim namesake."""

from __future__ import annotations

import pytest
import torch

from graft import Graft
from tests.helpers import TOLERANCE, assert_trajectories_close, flat, make_model, train

STEPS = 6

# (rule name, keywords): momentum, nesterov, weight decay, amsgrad, centering, maximize...
CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adam", {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.2, "amsgrad": True}),
    ("adagrad", {"lr": 0.1}),
    (
        "adagrad",
        {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
    ),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "centered": True, "maximize": True}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5}),
]
TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in CASES]


def torch_trajectory(name, keywords, dtype):
    model = make_model(dtype)
    optimizer = TORCH[name](model.parameters(), **keywords, foreach=False)
    return train(model, optimizer, STEPS), model, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "keywords"), CASES, ids=IDS)
@pytest.mark.parametrize("variant", ["plain", "self-graft", "generic"])
def test_rule_equals_torch(name, keywords, dtype, variant):
    expected, torch_model, torch_optimizer = torch_trajectory(name, keywords, dtype)
    model = make_model(dtype)
    start = flat(model)
    magnitude = {"name": name, **keywords}
    if variant == "self-graft":  # X(lr)#X(3·lr): D's lr must cancel
        optimizer = Graft(model.parameters(), magnitude, {**magnitude, "lr": 3 * keywords["lr"]})
    else:
        optimizer = Graft(model.parameters(), magnitude, generic=variant == "generic")
    actual = train(model, optimizer, STEPS)
    assert_trajectories_close(actual, expected, dtype, start=start)

    # The state is torch's own, key for key, under "magnitude".
    for param, torch_param in zip(model.parameters(), torch_model.parameters()):
        ours = optimizer.state[param]["magnitude"]
        theirs = torch_optimizer.state[torch_param]
        assert ours.keys() == theirs.keys()
        for key in theirs:
            tolerance = TOLERANCE[dtype] * 10  # state is one step further from rounding
            atol = tolerance * theirs[key].abs().max().item()
            torch.testing.assert_close(ours[key], theirs[key], rtol=tolerance, atol=atol)


def test_graft_of_identical_specs_is_plain_magnitude():
    optimizer = Graft(make_model().parameters(), {"name": "adam"}, {"name": "adam"})
    assert not optimizer.grafting()
    assert optimizer.param_groups[0]["direction"] is None
