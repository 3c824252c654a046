"""Rules torch.optim lacks (LARS, LAMB, AdaGrad with momentum) against plain per-tensor
references written from the papers' formulas."""

from __future__ import annotations

import pytest
import torch

from graft import Graft
from tests.helpers import assert_trajectories_close, flat, make_model, train

STEPS = 6


class Reference(torch.optim.Optimizer):
    """One tensor at a time, straight from the formulas; no foreach, no folding."""

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

    def adagrad_momentum(self, w, g, state, h):
        state["t"] = t = state.get("t", 0) + 1
        g = g + h["weight_decay"] * w
        s = state.setdefault("s", torch.zeros_like(w))
        s.add_(g * g)
        b = state.setdefault("b", torch.zeros_like(w))
        b.mul_(h["momentum"]).add_(g / (s.sqrt() + h["eps"]))
        w.sub_(h["lr"] / (1 + (t - 1) * h["lr_decay"]) * b)


LARS = {"lr": 2.0, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02, "eps": 1e-8}
LAMB = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.05}
CASES = [
    ("lars", {**LARS, "skip_1d": True}),
    ("lars", {**LARS, "skip_1d": False}),
    ("lars", {**LARS, "momentum": 0.0, "weight_decay": 0.0, "skip_1d": True}),
    ("lamb", {**LAMB, "skip_1d": True}),
    ("lamb", {**LAMB, "skip_1d": False, "weight_decay": 0.0}),
    ("adagrad", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "lr_decay": 0.1, "eps": 1e-10}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "keywords"), CASES)
@pytest.mark.parametrize("generic", [False, True])
def test_rule_equals_reference(name, keywords, dtype, generic):
    model = make_model(dtype)
    rule = "adagrad_momentum" if name == "adagrad" else name
    expected = train(model, Reference(model.parameters(), rule, **keywords), STEPS)

    model = make_model(dtype)
    start = flat(model)
    optimizer = Graft(model.parameters(), {"name": name, **keywords}, generic=generic)
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
