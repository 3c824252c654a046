"""The variants torch.optim has no counterpart for (LARS, LAMB, AdaGrad with momentum) against
plain per-tensor references written from the papers' formulas."""

from __future__ import annotations

import pytest
import torch

from graft import Graft
from graft.optim.rules import RULES, variant_specs
from graft.optim.spec import normalize
from tests.helpers import assert_trajectories_close, flat, make_model, train

STEPS = 6


class Reference(torch.optim.Optimizer):
    """One tensor at a time, straight from the formulas; no foreach, no folding. One method
    per rule name, taking every keyword of the rule."""

    def __init__(self, params, rule, **hyper):
        super().__init__(params, {"rule": rule, **hyper})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is not None:
                    getattr(self, group["rule"])(w, w.grad, self.state[w], group)

    def lars(self, w, g, state, h):
        skip = h["skip_1d"] and w.ndim <= 1
        w_norm, g_norm = w.norm(), g.norm()
        trust = h["trust_coefficient"] * w_norm / (g_norm + h["weight_decay"] * w_norm + h["eps"])
        if skip or w_norm == 0 or g_norm == 0:
            trust = 1.0
        scaled = h["lr"] * trust * (g + h["weight_decay"] * w)
        buffer = state.setdefault("b", torch.zeros_like(w))
        buffer.mul_(h["momentum"]).add_(scaled)
        w.sub_(buffer)

    def lamb(self, w, g, state, h):
        beta1, beta2 = h["betas"]
        state["t"] = t = state.get("t", 0) + 1
        m = state.setdefault("m", torch.zeros_like(w))
        v = state.setdefault("v", torch.zeros_like(w))
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        r = m_hat / (v_hat.sqrt() + h["eps"]) + h["weight_decay"] * w
        w_norm, r_norm = w.norm(), r.norm()
        trust = w_norm / r_norm
        if (h["skip_1d"] and w.ndim <= 1) or w_norm == 0 or r_norm == 0:
            trust = 1.0
        w.sub_(h["lr"] * trust * r)

    def adagrad(self, w, g, state, h):
        """With momentum (torch.optim.Adagrad is the reference without)."""
        state["t"] = t = state.get("t", 0) + 1
        g = g + h["weight_decay"] * w
        s = state.setdefault("s", torch.zeros_like(w))
        s.add_(g * g)
        b = state.setdefault("b", torch.zeros_like(w))
        b.mul_(h["momentum"]).add_(g / (s.sqrt() + h["eps"]))
        w.sub_(h["lr"] / (1 + (t - 1) * h["lr_decay"]) * b)


# Every variant whose rule has no torch.optim counterpart for it (the rest:
# test_rules_match_torch.py), with every keyword filled in for the reference.
CASES = {
    label: normalize(spec, "test")
    for label, spec in variant_specs().items()
    if RULES[spec["name"]].reference_class(normalize(spec, "test")) is None
}


def test_every_rule_is_held_to_a_reference():
    """Each rule has variants: each is tested here or against torch (test_rules_match_torch)."""
    assert {spec["name"] for spec in variant_specs().values()} == set(RULES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("black_box", [False, True])
def test_rule_equals_reference(spec, dtype, black_box):
    name, hyper = spec["name"], {key: value for key, value in spec.items() if key != "name"}
    model = make_model(dtype)
    expected = train(model, Reference(model.parameters(), name, **hyper), STEPS)

    model = make_model(dtype)
    start = flat(model)
    optimizer = Graft(model.parameters(), spec, black_box=black_box)
    actual = train(model, optimizer, STEPS)
    assert_trajectories_close(actual, expected, dtype, start=start)


def test_lamb_magnitude_is_lr_times_weight_norm():
    """LAMB's defining property: ‖u‖ = lr·‖w‖ for every tensor it scales (‖w‖ > 0)."""
    model = make_model(torch.float64)
    weight_norms = torch.stack([p.detach().norm() for p in model.parameters()])
    optimizer = Graft(model.parameters(), {"name": "lamb", "lr": 0.01, "skip_1d": False})
    train(model, optimizer, 1)
    scaled = weight_norms > 0  # the LayerNorm bias starts at 0: trust ratio 1
    assert scaled.sum() >= 6
    torch.testing.assert_close(
        optimizer.last_norms.magnitude[scaled], 0.01 * weight_norms[scaled], rtol=1e-12, atol=0
    )
