"""Graft(compile=True): the eager step's results through both paths (the native CPU loops
and inductor's graphs), its state_dict, no recompiles, and an eager fallback with one
warning where the step cannot be compiled."""

from __future__ import annotations

import copy
import functools
import itertools
import pickle
import shutil
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import graft.optim.compiled as compiled
import graft.optim.rules.adam as adam_rule
from graft import Graft
from graft.optim import native
from graft.optim.rules import variant_specs
from graft.optim.rules.sgd import SGD
from tests.helpers import (
    SPECS,
    TOLERANCE,
    assert_trajectories_close,
    compute_grads,
    make_model,
    train,
)
from tests.runs import QUIET, relative_differences, train_in_process

pytestmark = pytest.mark.compile

STEPS = 10
# The flags and scalars SPECS leaves off, so that every branch of every rule's pointwise form
# is traced: the variants the registry marks `compiled` (`Rule.variants`).
VARIANTS = variant_specs(compiled=True)
# The paper's three rules: their pairs run through the real compiler (inductor, C++).
PAPER_PAIRS = list(itertools.product(("sgd", "adam", "adagrad"), repeat=2))
# The pairs traced against the eager step: every rule in both roles (against Adam; Adam
# against SGD), every rule with itself (where M's and D's states could be confused) and the
# paper's nine. A pair's graph is its two sides' pointwise forms, each traced on its own,
# joined by the one ratio function, so these cover what all 49 pairs would, in 21.
TRACED_PAIRS = list(
    dict.fromkeys(
        [
            *((name, "adam" if name != "adam" else "sgd") for name in SPECS),
            *(("adam" if name != "adam" else "sgd", name) for name in SPECS),
            *((name, name) for name in SPECS),
            *PAPER_PAIRS,
        ]
    )
)
# The rules the native CPU loops step (graft/optim/native), and their flags' variants.
NATIVE_SPECS = {name: SPECS[name] for name in native.LOOPS}
NATIVE_PAIRS = list(itertools.product(NATIVE_SPECS, repeat=2))
NATIVE_VARIANTS = {name: spec for name, spec in VARIANTS.items() if spec["name"] in native.LOOPS}


@pytest.fixture
def traced_only(monkeypatch):
    """Trace and run the graphs without generating C++ (AOT autograd, eager kernels): the
    same pointwise math, checked in a fraction of the compile time. Every rule takes the
    graphs (the native loops off)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    monkeypatch.setattr(compiled, "NATIVE", False)


@pytest.fixture
def graphs_only(monkeypatch):
    """Inductor's graphs for every rule, the native loops off."""
    monkeypatch.setattr(compiled, "NATIVE", False)


def trajectories(magnitude, direction, granularity, dtype, steps=STEPS, model_of=make_model):
    """The weights after each step, eager then compiled, from the same start; checks that
    the last step's norms agree too, tensor for tensor."""
    runs, norms = [], []
    for compile in (False, True):
        model = model_of(dtype)
        optimizer = Graft(model.parameters(), magnitude, direction, granularity, compile=compile)
        runs.append(train(model, optimizer, steps))
        names = {param: name for name, param in model.named_parameters()}
        last = optimizer.last_norms
        norms.append(([names[p] for p in last.params], last.magnitude, last.direction))
        if compile:  # every step compiled but the first, which creates the state
            assert optimizer._compiled.failed is None
            assert optimizer._compiled.steps == steps - 1
            loops = all(spec["name"] in native.LOOPS for spec in (magnitude, direction))
            path = "native" if compiled.NATIVE and loops else "graph"
            tensor_steps = optimizer._compiled.tensor_steps
            stepped = len(last.params) * (steps - 1)
            assert tensor_steps[path] == sum(tensor_steps.values()) == stepped
    (eager_names, *eager_norms), (compiled_names, *compiled_norms) = norms
    assert compiled_names == eager_names
    # A norm is one number per tensor, not averaged out like a weight vector: centered
    # RMSprop's s - a² cancels, so an ulp apart in the state is a few ulps in ‖u‖ (fp32).
    rtol = {torch.float32: 1e-5, torch.float64: TOLERANCE[torch.float64]}[dtype]
    for compiled_norm, eager_norm in zip(compiled_norms, eager_norms, strict=True):
        torch.testing.assert_close(compiled_norm, eager_norm, rtol=rtol, atol=0)
    return runs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), TRACED_PAIRS)
def test_each_rule_in_each_role_traces_to_the_eager_step(
    traced_only, magnitude, direction, granularity, dtype
):
    eager, compiled_run = trajectories(SPECS[magnitude], SPECS[direction], granularity, dtype)
    assert_trajectories_close(compiled_run, eager, dtype)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_flag_traces_to_the_eager_step(traced_only, name, granularity):
    """Each variant as magnitude and as direction, against Adam (or SGD for Adam)."""
    other = SPECS["sgd"] if VARIANTS[name]["name"] == "adam" else SPECS["adam"]
    for magnitude, direction in ((VARIANTS[name], other), (other, VARIANTS[name])):
        eager, compiled_run = trajectories(magnitude, direction, granularity, torch.float64)
        assert_trajectories_close(compiled_run, eager, torch.float64)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), PAPER_PAIRS)
def test_compiled_paper_pairs_match_eager_fp32(graphs_only, magnitude, direction, granularity):
    """Through inductor's C++: 1e-6 relative over 10 steps (M#M is plain M, compiled too)."""
    eager, compiled_run = trajectories(
        SPECS[magnitude], SPECS[direction], granularity, torch.float32
    )
    assert_trajectories_close(compiled_run, eager, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), NATIVE_PAIRS)
def test_native_loops_match_the_eager_step(magnitude, direction, granularity, dtype):
    """Every pair of the rules the native loops take: 1e-6 relative over 10 steps in fp32."""
    eager, native_run = trajectories(
        NATIVE_SPECS[magnitude], NATIVE_SPECS[direction], granularity, dtype
    )
    assert_trajectories_close(native_run, eager, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("name", NATIVE_VARIANTS)
def test_every_flag_of_the_native_loops_matches_the_eager_step(name, granularity, dtype):
    """Each variant as magnitude and as direction, against Adam (or SGD for Adam)."""
    other = SPECS["sgd"] if NATIVE_VARIANTS[name]["name"].startswith("adam") else SPECS["adam"]
    for magnitude, direction in ((NATIVE_VARIANTS[name], other), (other, NATIVE_VARIANTS[name])):
        eager, native_run = trajectories(magnitude, direction, granularity, dtype)
        assert_trajectories_close(native_run, eager, dtype)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize(("magnitude", "direction"), [("adam", "sgd"), ("sgd", "adam")])
def test_native_loops_over_many_blocks_match_the_eager_step(magnitude, direction, granularity):
    eager, native_run = trajectories(
        SPECS[magnitude], SPECS[direction], granularity, torch.float32, model_of=wide_model
    )
    assert_trajectories_close(native_run, eager, torch.float32)


def wide_model(dtype: torch.dtype) -> torch.nn.Module:
    """A 50,750-value matrix: three 16,384-value blocks (the native loops' unit of work
    across threads) and a ragged tail, beside small tensors."""
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(8, 203), torch.nn.Tanh()]
    layers += [torch.nn.Linear(203, 250), torch.nn.Tanh(), torch.nn.Linear(250, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def test_native_norms_and_weights_do_not_depend_on_the_thread_count():
    """Each block's sum is added in block order, whatever thread computed it. The gradients
    are fixed tensors: a model's backward may itself change with the thread count (BLAS)."""
    shapes = [(203, 250), (250,), (3, 250), (3,)]  # 50,750 values: three blocks and a tail
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            generator = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
            optimizer = Graft(params, SPECS["adam"], SPECS["sgd"], "global", compile=True)
            for _ in range(4):
                for param in params:
                    param.grad = torch.randn(param.shape, generator=generator)
                optimizer.step()
            assert optimizer._compiled.tensor_steps["native"] > 0
            results.append(([p.detach().clone() for p in params], optimizer.last_norms))
    finally:
        torch.set_num_threads(threads)
    (weights, norms), *others = results
    for other_weights, other_norms in others:
        assert all(torch.equal(a, b) for a, b in zip(weights, other_weights, strict=True))
        assert torch.equal(norms.magnitude, other_norms.magnitude)
        assert torch.equal(norms.direction, other_norms.direction)


def test_native_and_graph_tensors_share_one_step(traced_only, monkeypatch):
    """bf16 weights take the graphs, fp32 ones the native loops: one global step over both,
    its norms in the parameters' order."""
    monkeypatch.setattr(compiled, "NATIVE", True)
    generator = torch.Generator().manual_seed(0)
    shapes_and_dtypes = [((5, 3), torch.float32), ((4,), torch.bfloat16), ((3, 3), torch.float32)]

    def make_params():
        return [
            torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
            for shape, dtype in shapes_and_dtypes
        ]

    runs = []
    for compile in (False, True):
        generator.manual_seed(0)
        params = make_params()
        optimizer = Graft(params, SPECS["adam"], SPECS["sgd"], "global", compile=compile)
        for _ in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
            optimizer.step()
        runs.append((params, optimizer.last_norms))
    assert optimizer._compiled.tensor_steps == {"native": 6, "graph": 3, "whole": 0}
    (eager, eager_norms), (compiled_params, compiled_norms) = runs
    assert compiled_norms.params == compiled_params
    for a, b in zip(compiled_params, eager, strict=True):
        tolerance = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    # the eager step orders its norms by dtype (its chunks), the compiled one as the params
    order = [next(i for i, p in enumerate(eager_norms.params) if p is q) for q in eager]
    for side in ("magnitude", "direction"):
        eager_side = getattr(eager_norms, side)[order]
        torch.testing.assert_close(getattr(compiled_norms, side), eager_side, rtol=1e-2, atol=0)


def zero_norm_run(compile: bool, granularity: str, dtype: torch.dtype):
    """sgd(momentum)#sgd where D's update vanishes: one tensor's gradient is 0 after the
    first step (‖u_D‖ = 0 < ‖u_M‖), another's always (both 0), and from the third step on
    every gradient is 0 (the global ‖u_D‖ is 0). Returns the weights after each step and
    the optimizer."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (3, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in shapes]
    magnitude = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    optimizer = Graft(params, magnitude, {"name": "sgd", "lr": 0.1}, granularity, compile=compile)
    trajectory = []
    for step in range(4):
        for index, param in enumerate(params):
            live = step < 2 and (index == 0 or (index == 1 and step == 0))
            grad = torch.randn(param.shape, generator=generator, dtype=dtype)
            param.grad = grad if live else torch.zeros_like(param)
        optimizer.step()
        trajectory.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return trajectory, optimizer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("path", ["native", "graph"])
def test_a_vanishing_direction_gives_no_step_on_every_path(path, granularity, dtype, monkeypatch):
    """‖u_D‖ = 0 (with ‖u_M‖ > 0 or = 0) scales u_D = 0 by ‖u_M‖ / eps: no step, as eagerly."""
    if path == "graph":  # traced, as in traced_only
        monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
        monkeypatch.setattr(compiled, "NATIVE", False)
    eager, _ = zero_norm_run(False, granularity, dtype)
    trajectory, optimizer = zero_norm_run(True, granularity, dtype)
    assert optimizer._compiled.tensor_steps[path] > 0
    assert_trajectories_close(trajectory, eager, dtype)
    assert torch.equal(trajectory[-1], trajectory[1])  # nothing moved once u_D = 0
    last = optimizer.last_norms
    assert torch.count_nonzero(last.direction) == 0 and torch.all(last.magnitude[:2] > 0)


def reversed_scalars(helper):
    """`helper` (a rule's scalars function) with its names in reverse order."""

    def reordered(*args, **kwargs):
        return dict(reversed(helper(*args, **kwargs).items()))

    return reordered


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_scalars_reach_the_native_loops_by_name_in_any_order(granularity, monkeypatch):
    """Adam's shared helper with its names reversed: the loops still read each by name."""
    monkeypatch.setattr(adam_rule, "moment_scalars", reversed_scalars(adam_rule.moment_scalars))
    monkeypatch.setattr(SGD, "scalars", reversed_scalars(SGD.scalars))
    adam = next(spec for spec in VARIANTS.values() if spec["name"] == "adam")  # its every flag
    for magnitude, direction in ((adam, SPECS["sgd"]), (SPECS["sgd"], SPECS["adam"])):
        eager, native_run = trajectories(magnitude, direction, granularity, torch.float64)
        assert_trajectories_close(native_run, eager, torch.float64)


@pytest.fixture
def fresh_loop_names():
    """The native loops' names checked again, as at the first use in a process."""
    native.loop_names.cache_clear()
    yield
    native.loop_names.cache_clear()


def renamed(helper, old: str, new: str):
    """`helper` (a rule's scalars or flags function) with the name `old` spelled `new`."""

    def rename(*args, **kwargs):
        return {new if key == old else key: v for key, v in helper(*args, **kwargs).items()}

    return rename


class RenamedLoops:
    """The built loops, but declaring `old` as `new` among `rule`'s names of `what`."""

    def __init__(self, rule: str, what: int, old: str, new: str) -> None:
        self.loops, self.rule, self.what, self.old, self.new = (
            native.extension(),
            rule,
            what,
            old,
            new,
        )

    def names(self):
        names = self.loops.names()
        lists = [list(names_) for names_ in names[self.rule]]
        lists[self.what] = [self.new if n == self.old else n for n in lists[self.what]]
        return {**names, self.rule: tuple(lists)}


@pytest.mark.parametrize(
    "rename",
    ["python scalar", "python flag", "native scalar", "native flag"],
)
def test_a_name_the_native_loops_and_a_rule_spell_differently_fails_loudly(
    fresh_loop_names, monkeypatch, rename
):
    """A renamed scalar or flag, on either side: LoopNamesError at the first compiled step,
    before any weight or state moves, naming the rule and both spellings."""
    if rename == "python scalar":
        monkeypatch.setattr(
            adam_rule, "moment_scalars", renamed(adam_rule.moment_scalars, "beta2", "beta_2")
        )
        missing, unknown = "beta2", "beta_2"
    elif rename == "python flag":
        monkeypatch.setattr(
            adam_rule.Adam, "flags", renamed(adam_rule.Adam.flags, "amsgrad", "ams")
        )
        missing, unknown = "amsgrad", "ams"
    else:
        what, old = (0, "beta2") if rename == "native scalar" else (2, "amsgrad")
        loops = RenamedLoops("adam", what, old, old.upper())
        monkeypatch.setattr(native, "extension", lambda: loops)
        missing, unknown = old.upper(), old
    model = make_model()
    optimizer = grafted(model, compile=True)
    train(model, optimizer, 1)  # the first step runs eagerly
    before = tensors_of(model, optimizer)
    with pytest.raises(native.LoopNamesError, match="native loops for 'adam'") as error:
        train(model, optimizer, 1, offset=1)
    message = str(error.value)
    assert f"missing from the rule: ['{missing}']" in message
    assert f"unknown to the loops: ['{unknown}']" in message
    after = tensors_of(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def tensors_of(model, optimizer) -> list[torch.Tensor]:
    """Copies of the weights and of every state tensor (step counts included)."""
    state = optimizer.state_dict()["state"]
    tensors = [*model.parameters()]
    tensors += [v for roles in state.values() for s in roles.values() for v in s.values()]
    return [tensor.detach().clone() for tensor in tensors]


@pytest.fixture
def unbuilt_native(monkeypatch, tmp_path):
    """The native loops not built yet, in an empty extensions directory. The test gets a cache
    of its own, so the loops this process already loaded stay loaded after it (a second load
    in one process would build them again, about 25 s)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "extension", functools.cache(native.extension.__wrapped__))


def test_native_loops_that_cannot_be_built_fall_back_to_eager(unbuilt_native, monkeypatch):
    """No C++ compiler: one warning naming the failure, then eager steps, bit for bit."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    message, optimizer = assert_one_warning_then_eager_steps()
    assert "/nonexistent/c++" in message and len(message) < 200
    assert optimizer._compiled.failed is not None and optimizer._compiled.steps == 0


def grafted(model, compile: bool, **kwargs) -> Graft:
    return Graft(model.parameters(), SPECS["adam"], SPECS["sgd"], compile=compile, **kwargs)


@pytest.mark.parametrize("path", ["native", "graph"])
@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_a_checkpoint_moves_between_eager_and_compiled(first, path, monkeypatch):
    """Half the steps one way, a state_dict round trip, the rest the other way: the same
    weights as eager throughout, and the same state_dict layout either way."""
    if path == "graph":  # traced, as in traced_only
        monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
        monkeypatch.setattr(compiled, "NATIVE", False)
    model = make_model()
    reference = train(model, grafted(model, compile=False), STEPS)

    model = make_model()
    before = grafted(model, compile=first == "compiled")
    trajectory = train(model, before, STEPS // 2)
    after = grafted(model, compile=first == "eager")
    after.load_state_dict(before.state_dict())
    trajectory += train(model, after, STEPS // 2, offset=STEPS // 2)
    assert_trajectories_close(trajectory, reference, torch.float32)
    compiled_step = (before if first == "compiled" else after)._compiled
    assert compiled_step.tensor_steps[path] > 0

    eager_state, compiled_state = (
        optimizer.state_dict()["state"]
        for optimizer in sorted((before, after), key=lambda o: o._compiled is not None)
    )
    assert layout(eager_state) == layout(compiled_state)


def layout(state: dict) -> dict:
    """Every key of a state_dict's state, with each tensor's shape and dtype."""
    return {
        index: {
            role: {key: (tuple(value.shape), value.dtype) for key, value in entries.items()}
            for role, entries in roles.items()
        }
        for index, roles in state.items()
    }


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_no_recompiles_as_the_learning_rate_and_step_count_change(graphs_only, granularity):
    model = make_model()
    optimizer = grafted(model, compile=True, granularity=granularity)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    train(model, optimizer, 2, after_step=lambda _: scheduler.step())
    graphs = counters["stats"]["unique_graphs"]
    train(model, optimizer, 6, after_step=lambda _: scheduler.step(), offset=2)
    assert counters["stats"]["unique_graphs"] == graphs
    assert optimizer._compiled.steps == 7


def test_compile_must_be_a_boolean():
    with pytest.raises(
        ValueError, match=r"invalid compile='yes' for Graft; allowed: true or false"
    ):
        Graft(make_model().parameters(), SPECS["adam"], SPECS["sgd"], compile="yes")


def test_a_torch_optimizer_falls_back_to_eager_with_one_warning():
    model = make_model()
    with pytest.warns(UserWarning, match="compiles built-in rules only") as caught:
        optimizer = Graft(
            model.parameters(),
            {"name": "torch.optim.NAdam", "lr": 1e-3},
            SPECS["sgd"],
            compile=True,
        )
    assert len(caught) == 1
    train(model, optimizer, 2)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(graphs_only, monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    message, _ = assert_one_warning_then_eager_steps()
    assert "no C++ compiler found" in message and "second line" not in message


def test_a_copy_of_a_failed_compile_steps_eagerly_without_trying_again(graphs_only, monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    _, optimizer = assert_one_warning_then_eager_steps()
    for twin in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert twin._compiled.failed == optimizer._compiled.failed
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, so no second warning
            twin.step()  # its parameters are copies, with the gradients of the last step
        assert twin._compiled.steps == 0


def assert_one_warning_then_eager_steps() -> tuple[str, Graft]:
    """Train adam#sgd with compile=True where the step cannot be compiled: one warning
    line, and the eager weights bit for bit. Returns the warning and the optimizer."""
    model = make_model()
    reference = train(model, grafted(model, compile=False), STEPS)
    model = make_model()
    optimizer = grafted(model, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajectory = train(model, optimizer, STEPS)
    ours = [w for w in caught if "Graft(compile=True)" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "cannot compile the step here" in message and "\n" not in message
    assert ours[0].filename.endswith("helpers.py")  # the line that called optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(trajectory, reference, strict=True))
    return message, optimizer


def test_a_missing_cpp_compiler_falls_back_to_eager():
    """The real failure: inductor cannot find its compiler (and no cache hides that)."""
    model = make_model(torch.float64, seed=3)
    optimizer = Graft(model.parameters(), SPECS["lamb"], SPECS["rmsprop"], compile=True)
    with (
        torch._inductor.config.patch(
            {"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}
        ),
        pytest.warns(UserWarning, match="cannot compile the step here"),
    ):
        train(model, optimizer, 3)
    assert optimizer._compiled.failed is not None and optimizer._compiled.steps == 0


def test_torch_compile_of_a_compiled_step_works_as_for_torch_optimizers():
    """torch.compile(opt.step) of the eager path: tests/test_torch_compile_step.py."""
    model = make_model()
    reference = train(model, grafted(model, compile=False), 4)
    model = make_model()
    optimizer = grafted(model, compile=True)
    step = torch.compile(optimizer.step)
    trajectory = []
    for index in range(4):
        compute_grads(model, index)
        step()
        trajectory.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    assert_trajectories_close(trajectory, reference, torch.float32)


def channels_last_params(grad_layout: torch.memory_format) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=generator)
    param = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
    param.grad = torch.randn(4, 3, 3, 3, generator=generator).to(memory_format=grad_layout)
    return [param]


def test_channels_last_weights_compile(traced_only):
    results = []
    for compile in (False, True):
        params = channels_last_params(torch.channels_last)
        optimizer = Graft(params, SPECS["sgd"], SPECS["adam"], compile=compile)
        for _ in range(3):
            optimizer.step()
        results.append(params[0].detach().clone())
    assert optimizer._compiled.steps == 2
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_a_1x1_kernel_compiles_whatever_the_strides_of_its_size_1_dimensions(traced_only):
    """A channels_last 1x1 convolution (ResNet's bottleneck and projection layers) gets a
    gradient whose strides differ from the weight's in size-1 dimensions only: the same
    memory order, so the compiled step takes it."""
    results = []
    for compile in (False, True):
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(8, 4, 1, 1, generator=generator)
        param = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
        param.grad = torch.randn(8, 4, 1, 1, generator=generator)  # contiguous strides
        assert param.stride() != param.grad.stride()
        optimizer = Graft([param], SPECS["sgd"], SPECS["adam"], compile=compile)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                optimizer.step()
        results.append(param.detach().clone())
    assert optimizer._compiled.steps == 2
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_a_layout_the_graphs_do_not_take_steps_eagerly_with_one_warning(traced_only):
    params = channels_last_params(torch.contiguous_format)
    optimizer = Graft(params, SPECS["sgd"], SPECS["adam"], compile=True)
    with pytest.warns(UserWarning, match="memory layout the compiled step does not take") as w:
        for _ in range(3):
            optimizer.step()
    assert len([x for x in w if "memory layout" in str(x.message)]) == 1
    assert optimizer._compiled.steps == 0


def test_the_trainer_switch_compiles_the_step(tmp_path):
    """graft.compile=true trains the default cell to the eager run's weights and may be
    switched on when resuming an eager run. In float64: in float32 the two steps' rounding,
    amplified by six steps of a BatchNorm model's backward, differs by CPU (4e-4 relative
    on an AVX-512 EPYC)."""
    overrides = [
        *QUIET,
        "trainer.dtype=float64",
        "trainer.max_steps=6",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=3",
    ]
    assert train_in_process(tmp_path / "eager", *overrides) == 0
    assert train_in_process(tmp_path / "compiled", *overrides, "graft.compile=true") == 0
    differences = relative_differences(tmp_path / "eager", tmp_path / "compiled")
    assert max(differences.values()) < 1e-9, max(differences.items(), key=lambda kv: kv[1])

    resumed = tmp_path / "resumed"
    for item in (".hydra", "checkpoints"):
        shutil.copytree(tmp_path / "eager" / item, resumed / item)
    (resumed / "checkpoints/step_00000006.pt").unlink()
    assert train_in_process(resumed, *overrides, "graft.compile=true") == 0
    differences = relative_differences(tmp_path / "eager", resumed)
    assert max(differences.values()) < 1e-9, max(differences.items(), key=lambda kv: kv[1])
