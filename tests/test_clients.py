"""Graft inside the tools researchers already train with, each checked against torch.optim or
the grafting formula itself.

- Every scheduler in `torch.optim.lr_scheduler` (one that a newer torch adds is named in a
  skip, to be added here): plain M under it steps as its torch.optim namesake does, and a
  grafted pair's step has the norm of M's step under the same schedule.
- Optimizers from a maintained zoo (`pytorch-optimizer`) and torch's own that are not built-in
  rules, on the black-box path: plain M is the optimizer alone bit for bit, also across a
  state_dict round trip; M#D, with the zoo optimizer as M or as D, equals the black-box
  definition written out here (step a copy of each optimizer, measure, combine); in fp32 it
  steps as that definition measured in fp64, with each state in the optimizer's own dtypes.
  Steps far below the weights' ulp are measured.
- PyTorch Lightning: fit, checkpoint and resume bit for bit (weights_only, a class spec too),
  LearningRateMonitor on named groups, gradient clipping with accumulation, manual
  optimization, the learning-rate finder.
- transformers' Trainer with Graft and a scheduler passed in `optimizers=`, and building
  Graft itself (`optimizer_cls_and_kwargs`), checkpointed and resumed bit for bit.

CPU, tiny models; Lightning and transformers are imported inside their tests (seconds each).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from graft import Graft
from tests.helpers import SPECS, assert_trajectories_close, compute_grads, flat, make_model, train

STEPS = 6

# Each scheduler with arguments that change the lr within STEPS steps.
SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda k: 1 / (k + 1)),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda k: 0.8),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.3),
    "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=3),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=4),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.7),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=2),
            lr_scheduler.ExponentialLR(opt, gamma=0.7),
        ],
        milestones=[2],
    ),
    "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=5, power=2.0),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), lr_scheduler.ExponentialLR(opt, 0.9)]
    ),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS + 1),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
}


# The ones this torch has (a later torch may remove one).
IN_THIS_TORCH = [name for name in SCHEDULERS if hasattr(lr_scheduler, name)]


def torch_schedulers() -> set[str]:
    """Every public scheduler class torch.optim.lr_scheduler defines."""
    bases = (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)
    return {
        name
        for name, obj in vars(lr_scheduler).items()
        if inspect.isclass(obj)
        and issubclass(obj, bases)
        and not name.startswith("_")
        and obj is not lr_scheduler.LRScheduler
    }


def test_every_torch_scheduler_is_covered():
    """torch's version here changes from week to week: a scheduler it adds is named in a skip
    (add it to SCHEDULERS), rather than failing a suite nothing of ours changed."""
    present = torch_schedulers()
    assert present >= {name for name in SCHEDULERS if hasattr(lr_scheduler, name)}
    missing = sorted(present - set(SCHEDULERS))
    if missing:
        pytest.skip(f"torch {torch.__version__} adds {', '.join(missing)}: not in SCHEDULERS yet")


def step_scheduler(scheduler) -> None:
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(1.0)  # no improvement after the first: the lr drops (patience 0)
    else:
        scheduler.step()


TWINS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
PLAIN = {"sgd": {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "adam": {"name": "adam", "lr": 0.01}}


@pytest.mark.parametrize("scheduler_name", IN_THIS_TORCH)
@pytest.mark.parametrize("name", PLAIN)
def test_plain_m_under_every_scheduler_steps_as_torch(scheduler_name, name):
    dtype = torch.float64
    spec = PLAIN[name]
    keywords = {key: value for key, value in spec.items() if key != "name"}
    runs, lrs = [], []
    for make in (lambda params: TWINS[name](params, **keywords), lambda p: Graft(p, spec)):
        model = make_model(dtype)
        optimizer = make(model.parameters())
        scheduler = SCHEDULERS[scheduler_name](optimizer)
        seen = []

        def after(step, optimizer=optimizer, scheduler=scheduler, seen=seen):
            seen.append(optimizer.param_groups[0]["lr"])
            step_scheduler(scheduler)

        runs.append(train(model, optimizer, STEPS, after_step=after))
        lrs.append(seen)
    assert lrs[1] == lrs[0]
    assert len(set(lrs[0])) > 1  # the schedule did change the lr
    assert_trajectories_close(runs[1], runs[0], dtype, start=flat(make_model(dtype)))


def fixed_grads(params, step: int) -> list[torch.Tensor]:
    """Gradients that depend on the step only (not on the weights), so twins that hold
    different weights still see the same gradient."""
    generator = torch.Generator().manual_seed(2000 + step)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def step_on(params, grads, optimizer) -> list[torch.Tensor]:
    """Set the gradients, step; the step each tensor took."""
    before = [p.detach().clone() for p in params]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    return [p.detach() - b for p, b in zip(params, before)]


@pytest.mark.parametrize("scheduler_name", IN_THIS_TORCH)
def test_a_grafted_step_has_the_norm_of_m_under_every_scheduler(scheduler_name):
    """sgd#adam: each tensor's step is ‖u_SGD‖ / ‖u_Adam‖ · u_Adam, where u_SGD is torch's SGD
    under the same schedule (it cycles SGD's momentum too) and Adam's lr stays as given; with
    momentum 0, ‖u_SGD‖ = lr · ‖g‖: the step scales as the lr does."""
    dtype = torch.float64
    sgd = {"name": "sgd", "lr": 0.01}
    adam = {"name": "adam", "lr": 1e-3}
    params = [p.detach().requires_grad_() for p in make_model(dtype).parameters()]
    grafted = Graft(params, sgd, adam)
    sgd_params = [p.detach().clone().requires_grad_() for p in params]
    sgd_twin = torch.optim.SGD(sgd_params, lr=0.01)
    adam_params = [p.detach().clone().requires_grad_() for p in params]
    adam_twin = torch.optim.Adam(adam_params, lr=1e-3)
    schedulers = [SCHEDULERS[scheduler_name](opt) for opt in (grafted, sgd_twin)]
    for step in range(STEPS):
        lr, momentum = (grafted.param_groups[0][key] for key in ("lr", "momentum"))
        grads = fixed_grads(params, step)
        applied = step_on(params, grads, grafted)
        u_m = step_on(sgd_params, grads, sgd_twin)
        u_d = step_on(adam_params, grads, adam_twin)
        for u, m, d in zip(applied, u_m, u_d, strict=True):
            expected = m.norm() / d.norm() * d
            torch.testing.assert_close(u, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())
        torch.testing.assert_close(
            grafted.last_norms.magnitude, torch.stack([m.norm() for m in u_m])
        )
        if momentum == 0:
            lr_times_grad = torch.stack([lr * g.norm() for g in grads])
            torch.testing.assert_close(
                grafted.last_norms.magnitude, lr_times_grad, rtol=1e-12, atol=0
            )
        for scheduler in schedulers:
            step_scheduler(scheduler)


# Optimizers that are not built-in rules, taken through the black-box path: the popular
# ones of pytorch-optimizer, and torch.optim's own; each with keywords for a few steps.
ZOO = {
    "pytorch_optimizer.Lion": {"lr": 1e-4},
    "pytorch_optimizer.AdaBelief": {},
    "pytorch_optimizer.RAdam": {},
    "pytorch_optimizer.Ranger": {},
    "pytorch_optimizer.Lamb": {},
    "pytorch_optimizer.Prodigy": {"lr": 1.0},
    "pytorch_optimizer.AdamP": {},
    "pytorch_optimizer.MADGRAD": {},
    "pytorch_optimizer.DAdaptAdam": {"lr": 1.0},
    "pytorch_optimizer.Adan": {},
    "pytorch_optimizer.ScheduleFreeAdamW": {},  # steps only; train()/eval() are not Graft's
    "pytorch_optimizer.SOAP": {},
    "pytorch_optimizer.Shampoo": {},
    "pytorch_optimizer.AdEMAMix": {},
    "pytorch_optimizer.LaProp": {},
    "pytorch_optimizer.StableAdamW": {},
    "pytorch_optimizer.CAME": {},
    "pytorch_optimizer.ADOPT": {},
    "pytorch_optimizer.Tiger": {},
    # normalize_lr=True divides the lr in its constructor; Graft's lr is the spec's as given
    "pytorch_optimizer.GrokFastAdamW": {"normalize_lr": False},
    "torch.optim.NAdam": {},
    "torch.optim.RAdam": {},
    "torch.optim.Adamax": {},
    "torch.optim.ASGD": {},
    "torch.optim.Rprop": {},
    "torch.optim.Adadelta": {},
    "torch.optim.Adafactor": {},
    "torch.optim.Muon": {},  # 2-D tensors only
}
# Left out, and why:
#   pytorch_optimizer.SophiaH, AdaHessian: step on a Hessian estimate from a create_graph
#       backward that Graft's step does not make;
#   pytorch_optimizer.Kron: draws random numbers in its step (M and D copies differ by them);
#   pytorch_optimizer.Muon: wants each parameter flagged use_muon beforehand;
#   torch.optim.LBFGS: its step needs a closure (refused in one line: test below);
#   torch.optim.SparseAdam: sparse gradients only.


def zoo_spec(name: str) -> dict:
    return {"name": name, **ZOO[name]}


def zoo_params(name: str, model: nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    return [p for p in params if p.ndim == 2] if name == "torch.optim.Muon" else params


def zoo_class(name: str) -> type[torch.optim.Optimizer]:
    module, _, attribute = name.rpartition(".")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


@pytest.mark.parametrize("name", ZOO)
def test_a_zoo_optimizer_as_plain_m_is_the_optimizer_alone(name):
    """Bit for bit over 6 steps, and across a state_dict round trip at step 3 as the
    optimizer alone makes it (what these optimizers keep in their param groups or under
    other keys travels with the Graft's state_dict)."""
    dtype = torch.float64
    runs = []
    for make in (
        lambda params: zoo_class(name)(params, **ZOO[name]),
        lambda params: Graft(params, zoo_spec(name)),
    ):
        model = make_model(dtype)
        optimizer = make(zoo_params(name, model))
        first = train(model, optimizer, 3)
        saved = copy.deepcopy(optimizer.state_dict())
        twin = copy.deepcopy(model)
        resumed = make(zoo_params(name, twin))
        resumed.load_state_dict(saved)
        runs.append(
            (first + train(model, optimizer, 3, offset=3), train(twin, resumed, 3, offset=3))
        )
    assert isinstance(optimizer, Graft) and optimizer.black_box
    for trajectory, expected in zip(runs[1], runs[0], strict=True):
        for step, (actual, wanted) in enumerate(zip(trajectory, expected, strict=True)):
            assert torch.equal(actual, wanted), f"step {step}"


def reference_graft(params, make_magnitude, make_direction, steps, model, eps=1e-16, measure=None):
    """The black-box definition, written out: at each step a copy of M and a copy of D each
    step from the current weights on the current gradient (copies in `measure`, the weights'
    dtype if None, which their states keep throughout); their steps are measured and the
    weights move by ‖u_M‖ / (‖u_D‖ + eps) · u_D, per tensor, rounded once."""
    copies = []
    for make in (make_magnitude, make_direction):
        own = [p.detach().to(measure or p.dtype, copy=True).requires_grad_() for p in params]
        copies.append((own, make(own)))
    trajectory = []
    for step in range(steps):
        compute_grads(model, step)
        steps_taken = []
        for own, optimizer in copies:
            with torch.no_grad():
                for mine, param in zip(own, params):
                    mine.copy_(param)
                    mine.grad = param.grad.to(mine.dtype, copy=True)
            optimizer.step()
            steps_taken.append(
                [mine.detach() - param.detach().to(mine.dtype) for mine, param in zip(own, params)]
            )
        with torch.no_grad():
            for param, u_m, u_d in zip(params, *steps_taken):
                param.copy_(param.to(u_d.dtype) + u_m.norm() / (u_d.norm() + eps) * u_d)
        trajectory.append(flat(model))
    return trajectory


PARTNERS = {"magnitude": SPECS["sgd"], "direction": SPECS["adam"]}  # the built-in other half


def grafted_with_a_built_in_rule(name, role, dtype, measure=None):
    """The zoo optimizer as M (with SGD's direction) or as D (with Adam's magnitude): the
    trajectories of Graft and of the written-out definition, the start, and the Graft."""
    zoo = lambda params: zoo_class(name)(params, **ZOO[name])  # noqa: E731
    partner = PARTNERS[role]
    built_in = lambda params: TWINS[partner["name"]](  # noqa: E731
        params, **{k: v for k, v in partner.items() if k != "name"}
    )
    magnitude, direction = (zoo, built_in) if role == "magnitude" else (built_in, zoo)
    model = make_model(dtype)
    expected = reference_graft(
        zoo_params(name, model), magnitude, direction, STEPS, model, measure=measure
    )

    model = make_model(dtype)
    start = flat(model)
    specs = (zoo_spec(name), partner) if role == "magnitude" else (partner, zoo_spec(name))
    optimizer = Graft(zoo_params(name, model), *specs)
    return train(model, optimizer, STEPS), expected, start, optimizer


@pytest.mark.parametrize("role", ["magnitude", "direction"])
@pytest.mark.parametrize("name", ZOO)
def test_a_zoo_optimizer_grafted_with_a_built_in_rule_is_the_black_box_definition(name, role):
    dtype = torch.float64
    actual, expected, start, _ = grafted_with_a_built_in_rule(name, role, dtype)
    assert_trajectories_close(actual, expected, dtype, start=start)


def state_dtypes(state):
    if isinstance(state, torch.Tensor):
        return state.dtype
    if isinstance(state, dict):
        return {key: state_dtypes(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return [state_dtypes(value) for value in state]
    return type(state)


@pytest.mark.parametrize("role", ["magnitude", "direction"])
@pytest.mark.parametrize("name", ZOO)
def test_a_zoo_optimizer_grafted_in_fp32_steps_as_measured_in_fp64(name, role):
    """fp32 weights: each optimizer steps fp64 copies, so the steps are those of the
    definition measured in fp64 (its states kept in fp64) to 1e-4 of the largest step, where
    measuring in fp32 was off by up to 0.5 (SOAP as D) and by over 1e-4 for 16 of these 56
    cases. Between steps each state keeps the dtypes of the optimizer's own."""
    dtype = torch.float32
    actual, expected, start, optimizer = grafted_with_a_built_in_rule(
        name, role, dtype, measure=torch.float64
    )
    largest = max((e - start).abs().max().item() for e in expected)
    error = max((a - e).abs().max().item() for a, e in zip(actual, expected)) / largest
    assert error <= 1e-4

    model = make_model(dtype)
    params = zoo_params(name, model)
    alone = zoo_class(name)(params, **ZOO[name])
    train(model, alone, STEPS)
    for grafted, own in zip(optimizer.param_groups[0]["params"], params):
        assert state_dtypes(optimizer.state[grafted][role]) == state_dtypes(alone.state[own])


# Optimizers whose state depends on the weights' dtype: grafted, they step fp64 copies.
STATE_BY_DTYPE = {
    "pytorch_optimizer.StableAdamW": "Kahan compensation of 16-bit weights' own updates",
}


@pytest.mark.parametrize("name", ZOO)
def test_a_zoo_optimizer_grafted_in_bf16_keeps_its_state_dtypes(name):
    """The fp64 copies' state goes back to what the optimizer alone makes for bf16 weights:
    bf16 moments beside torch's fp32 step counts."""
    if name in STATE_BY_DTYPE:
        pytest.skip(f"{STATE_BY_DTYPE[name]}: not kept when grafted (Graft applies the step)")
    runs = []
    for role in ("magnitude", "direction"):
        model = make_model(torch.bfloat16)
        specs = (zoo_spec(name), SPECS["sgd"])
        optimizer = Graft(zoo_params(name, model), *(specs if role == "magnitude" else specs[::-1]))
        train(model, optimizer, 2)
        runs.append((optimizer, role))
    model = make_model(torch.bfloat16)
    params = zoo_params(name, model)
    alone = zoo_class(name)(params, **ZOO[name])
    train(model, alone, 2)
    for optimizer, role in runs:
        for grafted, own in zip(optimizer.param_groups[0]["params"], params):
            assert state_dtypes(optimizer.state[grafted][role]) == state_dtypes(alone.state[own])


# The black-box path steps fp64 copies of fp32 weights, so D's step is
# measured exactly where the weights' own dtype would lose it: below half a weight's ulp
# (fp32: 2^-24 ≈ 6e-8 relative). docs/graft_api.md gives the figures.
@pytest.mark.parametrize("direction_lr", [1e-2, 1e-5, 1e-8])
def test_the_black_box_measures_d_below_the_weights_ulp(direction_lr):
    """fp32 adam#sgd, one step from the same weights and gradient: torch.optim.SGD as D on
    the black-box path and the built-in sgd are both within 2e-5 of the step taken in fp64
    arithmetic (what is left is rounding the new weights to fp32), and every weight moves.
    Measured in fp32, the error was 3e-2 at D's lr 1e-5 and 1.1 at 1e-8 (89 % of the
    weights did not move)."""
    model = make_model(torch.float32)
    compute_grads(model, 0)
    steps = {}
    for label, direction, dtype in (
        ("exact", "sgd", torch.float64),
        ("built-in", "sgd", torch.float32),
        ("black box", "torch.optim.SGD", torch.float32),
    ):
        twin = copy.deepcopy(model).to(dtype)
        for mine, param in zip(twin.parameters(), model.parameters()):
            mine.grad = param.grad.to(dtype)
        start = flat(twin).double()
        spec = {"name": direction, "lr": direction_lr}
        Graft(twin.parameters(), SPECS["adam"], spec).step()
        steps[label] = flat(twin).double() - start
    exact = steps["exact"]
    for label in ("built-in", "black box"):
        assert ((steps[label] - exact).norm() / exact.norm()).item() <= 2e-5, label
        assert (steps[label] != 0).all(), label


def test_black_box_fp64_false_measures_in_the_weights_dtype():
    """The faster option's limit: fp32 copies lose D's step below half a weight's ulp, so at
    D's lr 1e-8 most weights stay where they were and the rest take all of ‖u_M‖."""
    model = make_model(torch.float32)
    start = flat(model)
    spec = {"name": "torch.optim.SGD", "lr": 1e-8}
    optimizer = Graft(model.parameters(), SPECS["adam"], spec, black_box_fp64=False)
    moved = train(model, optimizer, 1)[-1] - start
    assert (moved == 0).double().mean().item() > 0.5


def test_load_state_dict_keeps_black_box_fp64():
    model = make_model(torch.float32)
    spec = {"name": "torch.optim.SGD", "lr": 1e-8}
    optimizer = Graft(model.parameters(), SPECS["adam"], spec, black_box_fp64=False)
    train(model, optimizer, 1)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.black_box_fp64 is False


def muon_groups(params, **flags):
    """pytorch-optimizer's Muon's param groups: matrices and kernels orthogonalised, the rest
    on its AdamW, at the lr Muon alone gives them (a Graft group's lr is M's); `flags` added
    to both (a tag)."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "use_muon": True, **flags},
        {"params": [p for p in params if p.ndim < 2], "use_muon": False, "lr": 3e-4, **flags},
    ]


MUON = {"name": "pytorch_optimizer.Muon", "lr": 0.02}


def test_group_flags_reach_the_optimizer_on_the_black_box_path():
    """An optimizer that reads a flag from its param groups (Muon's use_muon) gets it, and
    a tag with it: plain M steps as the optimizer alone bit for bit, and as D it is the
    black-box definition."""
    dtype = torch.float64
    runs = []
    for make in (
        lambda params: zoo_class(MUON["name"])(muon_groups(params, name="body"), lr=MUON["lr"]),
        lambda params: Graft(muon_groups(params, name="body"), MUON),
    ):
        model = make_model(dtype)
        runs.append(train(model, make(list(model.parameters())), STEPS))
    for alone, grafted in zip(*runs, strict=True):
        assert torch.equal(alone, grafted)

    model = make_model(dtype)
    params = list(model.parameters())
    expected = reference_graft(
        params,
        lambda own: torch.optim.Adam(muon_groups(own), lr=SPECS["adam"]["lr"]),
        lambda own: zoo_class(MUON["name"])(muon_groups(own), lr=MUON["lr"]),
        STEPS,
        model,
    )
    model = make_model(dtype)
    optimizer = Graft(muon_groups(list(model.parameters())), SPECS["adam"], MUON)
    assert optimizer.param_groups[0]["use_muon"] is True
    start = flat(model)
    assert_trajectories_close(train(model, optimizer, STEPS), expected, dtype, start=start)


def test_an_optimizer_whose_step_needs_a_closure_is_a_one_line_value_error():
    with pytest.raises(ValueError) as error:
        Graft(make_model().parameters(), {"name": torch.optim.LBFGS}, SPECS["sgd"])
    assert "\n" not in str(error.value)
    assert "LBFGS steps only with a closure" in str(error.value)


# PyTorch Lightning: a LightningModule whose configure_optimizers returns a Graft.

ADAM_SGD = ({"name": "adam", "lr": 1e-2}, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
NADAM_SGD = ({"name": torch.optim.NAdam, "lr": 1e-2}, {"name": "sgd", "lr": 0.1, "momentum": 0.9})


def regression_data(batches: int = 4, batch_size: int = 8):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batches * batch_size, 4, generator=generator)
    targets = torch.randn(batches * batch_size, 2, generator=generator)
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)  # fixed order


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def lightning_module(make_optimizer, manual: bool = False):
    """A LightningModule over small_net(); make_optimizer(module) -> configure_optimizers'
    return value. manual: automatic_optimization=False, stepping as Lightning's docs show."""
    import lightning.pytorch as pl

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_net()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_index):
            inputs, targets = batch
            loss = nn.functional.mse_loss(self.net(inputs), targets)
            if manual:
                optimizer = self.optimizers()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
                self.lr_schedulers().step()
            return loss

        def configure_optimizers(self):
            return make_optimizer(self)

    return Regression()


def graft_with_scheduler(specs, groups=None):
    def make(module):
        params = groups(module) if groups else module.parameters()
        optimizer = Graft(params, *specs)
        scheduler = lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    return make


def trainer(**keywords):
    import lightning.pytorch as pl

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**defaults | keywords)


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("specs", [ADAM_SGD, NADAM_SGD], ids=["adam#sgd", "NAdam-class#sgd"])
def test_lightning_resumes_a_checkpoint_bit_for_bit(specs, tmp_path):
    """fit 2 epochs == fit 1, save_checkpoint, fit(ckpt_path=..., weights_only=True) to 2:
    the weights, the scheduler's lr and the optimizer's state, with a spec given as a class
    too (stored as its dotted path)."""
    make = graft_with_scheduler(specs)
    uninterrupted = lightning_module(make)
    trainer(max_epochs=2).fit(uninterrupted, regression_data())

    first = lightning_module(make)
    first_half = trainer(max_epochs=1)
    first_half.fit(first, regression_data())
    first_half.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = lightning_module(make)
    second_half = trainer(max_epochs=2)
    second_half.fit(
        resumed, regression_data(), ckpt_path=tmp_path / "epoch1.ckpt", weights_only=True
    )
    assert second_half.global_step == 8
    for resumed_weight, weight in zip(weights(resumed), weights(uninterrupted), strict=True):
        assert torch.equal(resumed_weight, weight)
    optimizer = second_half.optimizers[0]
    assert isinstance(optimizer, Graft)
    assert optimizer.param_groups[0]["lr"] == specs[0]["lr"] * 0.5**2  # steps 3 and 6


@pytest.mark.slow
def test_lightning_lr_monitor_logs_named_groups_m_momentum_and_weight_decay():
    """LearningRateMonitor reads each group's "name"; with log_momentum, M's β1 (the betas
    OneCycleLR cycles); with log_weight_decay, the pair's weight decay."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):
        name, version = "recorder", 0
        logged: list[dict] = []

        def log_metrics(self, metrics, step=None):
            self.logged.append(dict(metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    def make(module):
        body, head = module.net[0], module.net[2]
        groups = [
            {"params": body.parameters(), "name": "body"},
            {"params": head.parameters(), "name": "head", "lr": 2e-2, "weight_decay": 0.1},
        ]
        optimizer = Graft(groups, *ADAM_SGD)
        scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=[0.05, 0.1], total_steps=8)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    recorder = Recorder()
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True, log_weight_decay=True)
    run = trainer(max_epochs=2, logger=recorder, callbacks=[monitor], log_every_n_steps=1)
    run.fit(lightning_module(make), regression_data())
    lrs = [entry for entry in recorder.logged if "lr-Graft/body" in entry]
    assert len(lrs) == 8
    assert {"lr-Graft/head", "lr-Graft/body-momentum", "lr-Graft/head-momentum"} <= set(lrs[0])
    assert len({entry["lr-Graft/head"] for entry in lrs}) > 2  # the schedule's values
    momenta = [entry["lr-Graft/body-momentum"] for entry in lrs]
    assert max(momenta) == 0.95 and min(momenta) < 0.9  # OneCycleLR's defaults cycle β1
    assert {entry["lr-Graft/head-weight_decay"] for entry in lrs} == {0.1}
    assert {entry["lr-Graft/body-weight_decay"] for entry in lrs} == {0.0}


def hand_loop(specs, clip: float, accumulate: int, epochs: int = 2) -> list[torch.Tensor]:
    """What Lightning's automatic optimization with gradient_clip_val and
    accumulate_grad_batches does, written out: loss / accumulate per batch, clip the norm,
    step, scheduler step, zero_grad."""
    net = small_net()
    optimizer = Graft(net.parameters(), *specs)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    for _ in range(epochs):
        for index, (inputs, targets) in enumerate(regression_data()):
            loss = nn.functional.mse_loss(net(inputs), targets) / accumulate
            loss.backward()
            if (index + 1) % accumulate == 0:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    return weights(net)


@pytest.mark.slow
def test_lightning_clips_and_accumulates_gradients_for_graft():
    """gradient_clip_val=0.05 (which the gradients exceed) and accumulate_grad_batches=2
    reach Graft as in a hand-written loop (close, not bitwise: Lightning computes the
    clipping norm its own way)."""
    module = lightning_module(graft_with_scheduler(ADAM_SGD))
    run = trainer(max_epochs=2, gradient_clip_val=0.05, accumulate_grad_batches=2)
    run.fit(module, regression_data())
    assert run.global_step == 4
    expected = hand_loop(ADAM_SGD, clip=0.05, accumulate=2)
    for weight, wanted in zip(weights(module), expected, strict=True):
        torch.testing.assert_close(weight, wanted, rtol=1e-6, atol=1e-7)
    unclipped = hand_loop(ADAM_SGD, clip=math.inf, accumulate=2)
    assert not all(torch.allclose(a, b) for a, b in zip(expected, unclipped))


@pytest.mark.slow
def test_lightning_manual_optimization_steps_graft():
    module = lightning_module(graft_with_scheduler(ADAM_SGD), manual=True)
    run = trainer(max_epochs=2)
    run.fit(module, regression_data())
    expected = hand_loop(ADAM_SGD, clip=math.inf, accumulate=1)
    for weight, wanted in zip(weights(module), expected, strict=True):
        torch.testing.assert_close(weight, wanted, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_lightning_lr_finder_sweeps_grafts_lr_and_restores_it(tmp_path):
    """Tuner.lr_find writes M's lr through the group, checkpoints and restores the module
    and the Graft, and sets the module's lr to its suggestion, which fit's Graft then takes."""
    from lightning.pytorch.tuner import Tuner

    magnitude, direction = ADAM_SGD
    module = lightning_module(
        lambda module: Graft(module.parameters(), {**magnitude, "lr": module.lr}, direction)
    )
    module.lr = magnitude["lr"]
    start = weights(module)
    run = trainer(max_epochs=1, default_root_dir=str(tmp_path))
    data = regression_data(batches=20)
    found = Tuner(run).lr_find(module, train_dataloaders=data, num_training=20)
    assert len(found.results["lr"]) == 20
    lrs = found.results["lr"]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]  # it swept M's lr upwards
    assert math.isfinite(found.suggestion())
    for weight, before in zip(weights(module), start, strict=True):
        assert torch.equal(weight, before)  # restored
    assert module.lr == found.suggestion()
    run = trainer(max_epochs=1)
    run.fit(module, regression_data())
    assert run.optimizers[0].param_groups[0]["lr"] == found.suggestion()


# transformers' Trainer: given Graft and a scheduler in `optimizers=`, or Graft's class.


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertForMaskedLM(config)


def training_arguments(folder, **settings):
    """transformers' TrainingArguments for these tests: CPU, no reporting, batches of 4."""
    from transformers import TrainingArguments

    defaults = dict(
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(output_dir=str(folder), **defaults | settings)


def masked_examples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        input_ids = torch.randint(5, 64, (8,), generator=generator)
        labels = torch.full_like(input_ids, -100)
        labels[:2] = input_ids[:2]  # two masked positions per sequence
        input_ids[:2] = 4
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


@pytest.mark.slow
def test_transformers_trainer_trains_with_graft(tmp_path):
    from transformers import Trainer

    model = tiny_bert()
    optimizer = Graft(model.parameters(), *ADAM_SGD)
    scheduler = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=3)
    before = weights(model)
    args = training_arguments(tmp_path, max_steps=3, save_strategy="no", logging_steps=1)
    trainer_ = Trainer(
        model=model, args=args, train_dataset=masked_examples(12), optimizers=(optimizer, scheduler)
    )
    result = trainer_.train()
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    losses = [entry["loss"] for entry in trainer_.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1)
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))
    assert optimizer.last_norms is not None


@pytest.mark.slow
def test_transformers_trainer_builds_graft_and_resumes_it_bit_for_bit(tmp_path):
    """`optimizer_cls_and_kwargs=(Graft, ...)`: the Trainer's weight-decay groups (0.01, and
    0 for biases and norms) reach M and D; a run stopped at step 3 and resumed from its
    checkpoint (optimizer.pt, loaded weights_only) ends on the uninterrupted run's weights
    bit for bit, with a torch optimizer as D on the black-box path."""
    from transformers import Trainer, TrainerCallback

    class StopAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    pair = {"magnitude": {"name": "adamw", "lr": 1e-2}, "direction": {"name": "torch.optim.NAdam"}}

    def run(folder, resume=None, stop=False):
        args = training_arguments(
            folder,
            max_steps=6,
            learning_rate=1e-2,
            weight_decay=0.01,
            save_strategy="steps",
            save_steps=3,
        )
        trainer_ = Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=masked_examples(24),
            optimizer_cls_and_kwargs=(Graft, pair),
            callbacks=[StopAtThree()] if stop else None,
        )
        trainer_.train(resume_from_checkpoint=resume)
        return trainer_

    uninterrupted = run(tmp_path / "uninterrupted")
    decays = [
        (
            group["weight_decay"],
            group["magnitude"]["weight_decay"],
            group["direction"]["weight_decay"],
        )
        for group in uninterrupted.optimizer.param_groups
    ]
    assert decays == [(0.01, 0.01, 0.01), (0.0, 0.0, 0.0)]
    stopped = run(tmp_path / "stopped", stop=True)
    assert stopped.state.global_step == 3
    resumed = run(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for a, b in zip(weights(uninterrupted.model), weights(resumed.model), strict=True):
        assert torch.equal(a, b)
