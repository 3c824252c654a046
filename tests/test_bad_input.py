"""Every user mistake is a one-line ValueError naming the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from graft import Graft

ADAM = {"name": "adam", "lr": 1e-3}


def params():
    return [torch.nn.Parameter(torch.ones(3, 2))]


@pytest.mark.parametrize(
    ("kwargs", "bad", "allowed"),
    [
        (
            {"magnitude": {"name": "adamx"}},
            "'adamx'",
            "sgd, adam, adamw, adagrad, rmsprop, lars, lamb",
        ),
        ({"magnitude": ADAM, "direction": {"name": "torch.optim.Nope"}}, "Nope", "dotted path"),
        ({"magnitude": {"name": "adam", "beta": 0.9}}, "'beta'", "amsgrad, betas, decoupled"),
        ({"magnitude": {"name": "torch.optim.NAdam", "foo": 1}}, "'foo'", "momentum_decay"),
        ({"magnitude": {"name": "sgd", "lr": -0.1}}, "lr=-0.1", "lr >= 0"),
        ({"magnitude": {"name": "torch.optim.NAdam", "lr": -1.0}}, "lr=-1.0", "lr >= 0"),
        ({"magnitude": {"name": "adam", "betas": (0.9, 1.0)}}, "betas=(0.9, 1.0)", "[0, 1)"),
        (
            {"magnitude": ADAM, "direction": {"name": "lamb", "betas": [-0.1, 0.9]}},
            "betas",
            "[0, 1)",
        ),
        ({"magnitude": {"name": "adam", "eps": 0.0}}, "eps=0.0", "eps > 0"),
        ({"magnitude": {"name": "rmsprop", "eps": -1e-8}}, "eps=-1e-08", "eps > 0"),
        ({"magnitude": ADAM, "eps": 0.0}, "eps=0.0", "eps > 0"),
        ({"magnitude": ADAM, "eps": -1.0}, "eps=-1.0", "eps > 0"),
        ({"magnitude": ADAM, "granularity": "layer"}, "'layer'", "tensor, global"),
        ({"magnitude": "adam"}, "'adam'", "'name'"),
        ({"magnitude": {"lr": 0.1}}, "{'lr': 0.1}", "'name'"),
        ({"magnitude": {"name": "sgd", "nesterov": True}}, "nesterov=True", "momentum > 0"),
        ({"magnitude": {"name": "sgd", "momentum": -0.9}}, "momentum=-0.9", ">= 0"),
        ({"magnitude": {"name": "lars", "trust_coefficient": 0}}, "trust_coefficient=0", "> 0"),
    ],
)
def test_bad_spec_is_one_line_value_error(kwargs, bad, allowed):
    with pytest.raises(ValueError) as error:
        Graft(params(), **kwargs)
    message = str(error.value)
    assert "\n" not in message
    assert bad in message
    assert allowed in message


def test_param_group_key_that_no_optimizer_takes():
    group = {"params": params(), "betas": (0.9, 0.99)}
    with pytest.raises(ValueError, match=r"unknown param-group key 'betas'.*sgd"):
        Graft([group], {"name": "sgd"}, {"name": "lars"})


def test_param_group_cannot_swap_the_optimizer():
    group = {"params": params(), "direction": {"name": "adam"}}
    with pytest.raises(ValueError, match="changes the optimizer"):
        Graft([group], ADAM, {"name": "sgd"})


def test_param_group_cannot_change_granularity():
    group = {"params": params(), "granularity": "global"}
    with pytest.raises(ValueError, match="granularity='global' in param group 0"):
        Graft([group], ADAM, {"name": "sgd"})


def test_param_group_values_are_checked():
    group = {"params": params(), "lr": -1.0}
    with pytest.raises(
        ValueError, match=r"invalid lr=-1.0 for 'adam' in magnitude \(param group 0\)"
    ):
        Graft([group], ADAM)
