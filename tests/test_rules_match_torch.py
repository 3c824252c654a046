"""Each built-in rule, alone, grafted onto itself and through the black-box path, equals its
torch.optim counterpart, in every variant that has one (`Rule.variants`)."""

from __future__ import annotations

import pytest
import torch

from graft import Graft
from graft.optim.rules import RULES, variant_specs
from graft.optim.spec import normalize
from tests.helpers import TOLERANCE, assert_trajectories_close, flat, make_model, train

STEPS = 6


def torch_counterpart(spec):
    """The torch.optim class that computes this spec exactly, or None."""
    return RULES[spec["name"]].reference_class(normalize(spec, "test"))


# The variants without one are held to the papers' formulas: test_rules_reference.py.
CASES = {
    label: (spec["name"], {key: value for key, value in spec.items() if key != "name"})
    for label, spec in variant_specs().items()
    if torch_counterpart(spec) is not None
}


def torch_trajectory(name, keywords, dtype):
    model = make_model(dtype)
    reference = torch_counterpart({"name": name, **keywords})
    optimizer = reference(model.parameters(), **keywords, foreach=False)
    return train(model, optimizer, STEPS), model, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "keywords"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("how", ["plain", "self-graft", "black-box"])
def test_rule_equals_torch(name, keywords, dtype, how):
    expected, torch_model, torch_optimizer = torch_trajectory(name, keywords, dtype)
    model = make_model(dtype)
    start = flat(model)
    magnitude = {"name": name, **keywords}
    if how == "self-graft":  # X(lr)#X(3·lr): D's lr must cancel
        optimizer = Graft(model.parameters(), magnitude, {**magnitude, "lr": 3 * keywords["lr"]})
    else:
        optimizer = Graft(model.parameters(), magnitude, black_box=how == "black-box")
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
