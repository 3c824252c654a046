"""Graft's compiled step: each tensor's M step, D step and grafted update in two loops.

Eagerly, a grafted step is a chain of foreach ops, each a pass over memory. Compiled, each
tensor's step reads the weight, gradient and both states once, writes the states, reduces
‖u_M‖ and ‖u_D‖, then applies the scaled u_D. Global granularity needs every norm before
any weight moves, so it runs in two passes: one advancing the states and returning the
norms, one recomputing u_D from the advanced state and applying it (no model-sized
temporary either way).

Two paths do this, beside the eager one (Graft's foreach step, which this one falls back
to):
- **native** (graft/optim/native): hand-written CPU loops for SGD, Adam, AdamW and
  AdaGrad in float32/float64, built once per machine. They store the advanced states in
  the loop that sums the norms and compute each update once: a grafted step at the cost
  of torch's single-kernel (`fused=True`) M and D together.
- **graph**: every other CPU tensor (other rules, 16-bit dtypes) takes a graph
  torch.compile (inductor) makes of the rules' `pointwise` form, one call per tensor.
- **whole step**: a Graft whose tensors are all on a GPU takes one graph for its whole
  step: torch.compile of the eager foreach step itself (Graft._eager_step), as torch's
  compiled optimizers do. Inductor fuses each foreach op across tensors (horizontally) and
  the chain of ops per tensor (vertically), so a step is a handful of kernel launches
  whatever the number of tensors, where a graph per tensor is launches per tensor (161 for
  a ResNet-50). Under compilation the eager rules keep step counts and M's lr as 0-d fp64
  tensors (graft/optim/rules/base.py: `step_counts`, `traced_lr`), so neither a step nor
  a scheduler's lr recompiles it.

Both scale D's update by `grafting_ratio` (graft/optim/combine.py), in the graph or, for
the native loops, from the norms they return. The per-tensor data both paths take is in
graft/optim/compiled_items.py.

What stays on the host, so that nothing recompiles from one step to the next: the step
counts (0-d CPU tensors, as torch.optim keeps them) and every coefficient computed from
them and from the hyperparameters, in double precision as the eager rules do, handed to
the graph as one small tensor per rule. The graphs are compiled with dynamic shapes, so
one graph serves every tensor size; a graph is compiled per distinct set of rule flags
(e.g. amsgrad, weight decay on or off) and dtype.

A tensor's first step runs eagerly (it creates the state, as the eager rules do, e.g.
SGD's momentum buffer starts at the gradient), and so does any step where a tensor's
state or memory layout is not what the compiled step takes. If the native loops cannot
be built or torch.compile cannot work here (no C++ compiler, a platform without dynamo),
the first attempt fails before any real tensor moves (graphs compile on scratch copies):
one warning says why and the optimizer steps eagerly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from graft.optim import native
from graft.optim.combine import GraftLike, grafting_ratio
from graft.optim.compiled_items import Item, Role, Side
from graft.optim.rules.base import norm
from graft.optim.shards import is_sharded, local, sharding, whole_squares
from graft.optim.update import StepNorms

# torch.compile's backend; tests may use "aot_eager" to check the traced math without C++.
BACKEND = "inductor"
# Step the tensors the hand-written CPU loops take (graft/optim/native) with them; off,
# every tensor goes through inductor's graphs (tests of the graphs turn it off).
NATIVE = True
# The device types whose tensors take the whole-step graph (tests add "cpu": inductor's C++
# backend compiles the same graph).
WHOLE_STEP_DEVICES = ("cuda",)
# Graphs per compiled function per optimizer: flags × dtypes × numel-1 tensors, with room.
RECOMPILE_LIMIT = 64
# Recompute an update in the weight's loop rather than store it for the norm's loop and read
# it back: an update is a few flops per value, a stored one is a temporary the size of the
# tensor and 8 bytes per value of traffic (BERT-base's embedding, sgd#adam: 49 -> 35 ms).
INDUCTOR_OPTIONS = {
    "realize_opcount_threshold": 1000,
    "realize_reads_threshold": 100,
    "realize_acc_reads_threshold": 100,
}


def unpack(names: tuple[str, ...], packed: Tensor) -> dict[str, Tensor]:
    return dict(zip(names, packed.unbind(), strict=True))


def side_update(param, grad, state, packed, side: Side, advance: bool):
    return side.rule.pointwise(
        param, grad, state, unpack(side.names, packed), dict(side.flags), advance=advance
    )


def advanced(param, grad, state, packed, side: Side):
    """The side's update (tensor, coefficient) at this step, its state advanced, and its norm."""
    tensor, coeff = side_update(param, grad, state, packed, side, advance=True)
    return tensor, coeff, norm(tensor) * coeff.abs()


# The traced functions. Each takes one tensor's flat views; Side arguments are constants.
def tensor_step(param, grad, m_state, d_state, m_packed, d_packed, magnitude, direction, eps):
    """One tensor's whole step; with a direction, the per-tensor grafted step."""
    m_tensor, m_coeff, m_norm = advanced(param, grad, m_state, m_packed, magnitude)
    if direction is None:
        param.add_(m_tensor * m_coeff)
        return m_norm, m_norm
    d_tensor, d_coeff, d_norm = advanced(param, grad, d_state, d_packed, direction)
    param.add_(d_tensor * (grafting_ratio(m_norm, d_norm, eps) * d_coeff))
    return m_norm, d_norm


def norms_pass(param, grad, m_state, d_state, m_packed, d_packed, magnitude, direction, eps):
    """Global granularity, first pass: advance both states; the norms only (`eps` is
    unused: the pass takes tensor_step's arguments, graph_arguments)."""
    m_norm = advanced(param, grad, m_state, m_packed, magnitude)[2]
    return m_norm, advanced(param, grad, d_state, d_packed, direction)[2]


def apply_pass(param, grad, d_state, d_packed, direction, scale):
    """Global granularity, second pass: D's update again, from its advanced state, scaled."""
    tensor, coeff = side_update(param, grad, d_state, d_packed, direction, advance=False)
    param.add_(tensor * (scale * coeff))


def whole_step(graft: GraftLike) -> StepNorms:
    """The Graft's eager foreach step, traced as one graph (the whole-step path)."""
    return graft._eager_step()


@dataclass
class Views:
    """A parameter's flat views (weight, then state by role), and what they were made from."""

    data_ptr: int
    states: tuple[Tensor, ...]
    param: Tensor
    m_state: dict[str, Tensor]
    d_state: dict[str, Tensor]


def signature(item: Item) -> tuple:
    """What selects an item's graph: its sides, dtype, device and size class."""
    return (
        item.magnitude,
        item.direction,
        item.param.dtype,
        item.param.device,
        size_class(item.param.numel()),
    )


def graph_arguments(item: Item) -> tuple:
    """The item as tensor_step's (and norms_pass's) arguments."""
    return (
        item.param,
        item.grad,
        item.m_state,
        item.d_state,
        item.m_packed,
        item.d_packed,
        item.magnitude,
        item.direction,
        item.eps,
    )


def scratch(item: Item) -> Item:
    """The item over a few elements of fresh memory, of its size class: compiling on it
    first leaves the real tensors untouched if compiling fails."""
    size = min(item.param.numel(), SCRATCH_NUMEL[size_class(item.param.numel())])

    def copy(tensor: Tensor) -> Tensor:
        return tensor[:size].clone()

    return Item(
        item.parameter,
        copy(item.param),
        copy(item.grad),
        {key: copy(value) for key, value in item.m_state.items()},
        {key: copy(value) for key, value in item.d_state.items()},
        item.m_role,
        item.d_role,
        item.magnitude,
        item.direction,
        item.steps,
        item.eps,
        pack(item.m_role, 1.0, item.param),
        None if item.d_role is None else pack(item.d_role, 1.0, item.param),
    )


# The sizes inductor specializes on (0 and 1; sums of more than 4,096 values cascade), and
# how many values a scratch copy of each class holds.
SCRATCH_NUMEL = {0: 0, 1: 1, "small": 2, "large": 8192}


def size_class(numel: int) -> int | str:
    if numel < 2:
        return numel
    return "small" if numel <= 4096 else "large"


def pack(role: Role, step: float, param: Tensor) -> Tensor:
    """The role's scalars at `step`, as one tensor of the update's precision, in the
    order of `role.names` (what the graph unpacks them by)."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    scalars = role.scalars(step)
    values = [scalars[name] for name in role.names]
    return torch.tensor(values, dtype=dtype, device=param.device)


def flat(tensor: Tensor) -> Tensor | None:
    """A 1-d view of `tensor` in memory order (contiguous or channels_last), else None."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).view(-1)
    return None


def same_layout(tensor: Tensor, like: Tensor) -> bool:
    """Whether the two tensors hold their elements in the same memory order: equal strides
    wherever a dimension has more than one element. A size-1 dimension's stride is
    arbitrary: a channels_last 1x1 convolution's weight and its contiguous gradient agree."""
    return tensor.shape == like.shape and all(
        a == b for a, b, size in zip(tensor.stride(), like.stride(), tensor.shape) if size > 1
    )


def reason(error: BaseException) -> str:
    """The innermost cause of a compile failure, on one line: 'Type: first line'."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"


class CompiledStep:
    """The compiled form of one Graft's step (built-in rules only).

    `step(graft)` returns the step's norms, or None where this step must run eagerly
    (a tensor's first step, a layout the graphs do not take) or torch.compile failed
    (then `failed` says why, and every later call returns None at once). `steps` counts
    the steps it ran; `tensor_steps` the tensors each path stepped: "native" (the CPU
    loops of graft/optim/native), "graph" (inductor, a graph per tensor) and "whole" (one
    graph for the whole step, GPUs).
    """

    def __init__(self, granularity: str) -> None:
        self.granularity = granularity
        self.failed: str | None = None
        self.steps = 0
        self.tensor_steps = {"native": 0, "graph": 0, "whole": 0}  # tensors, by path
        self.compiled: set[tuple] = set()  # signatures whose graphs compiled on scratch
        self.warned_layout = False
        self.warned_sharded = False
        self.views: dict[Tensor, Views] = {}
        options = {
            "backend": BACKEND,
            "dynamic": True,
            "fullgraph": True,
            "recompile_limit": RECOMPILE_LIMIT,
            "isolate_recompiles": True,
            "options": INDUCTOR_OPTIONS if BACKEND == "inductor" else None,
        }
        self.tensor_step = torch.compile(tensor_step, **options)
        self.norms_pass = torch.compile(norms_pass, **options)
        self.apply_pass = torch.compile(apply_pass, **options)
        # The Graft's structure and flags are guarded; a new lr is an input, not a recompile.
        self.whole_step = torch.compile(
            whole_step,
            backend=BACKEND,
            fullgraph=True,
            recompile_limit=RECOMPILE_LIMIT,
            isolate_recompiles=True,  # this Graft's graphs only, not every Graft's in the process
        )

    def step(self, graft: GraftLike) -> StepNorms | None:
        if self.failed is not None:
            return None
        sharded = is_sharded(graft)
        tensors = None if sharded else whole_step_tensors(graft)
        if tensors is not None:
            return self.step_whole(graft, tensors)
        items = self.items(graft, sharded)
        if items is None:
            return None
        for item in items:
            item.native = NATIVE and native.takes(item)
        if any(item.native for item in items) and not self.load_native():
            return None
        new: dict[tuple, Item] = {}  # one graph item per signature not compiled yet
        for item in items:
            if not item.native and (key := signature(item)) not in self.compiled:
                new.setdefault(key, item)
        if new and not self.compile(list(new.values())):
            return None
        pack_scalars(items)
        calls = native.calls((i, item) for i, item in enumerate(items) if item.native)
        graphs = [(i, item) for i, item in enumerate(items) if not item.native]
        if sharded and graft.grafting():
            self.steps += 1
            self.tensor_steps["native"] += len(items) - len(graphs)
            self.tensor_steps["graph"] += len(graphs)
            return self.run_sharded(items, calls, graphs)
        if self.granularity == "global" and graft.grafting():
            parts = self.run_global(calls, graphs)
        else:
            parts = [Part.of_call(call, call.step()) for call in calls]
            if graphs:
                norms = [self.tensor_step(*graph_arguments(item)) for _, item in graphs]
                parts.append(Part.of_graphs(graphs, norms))
        self.steps += 1
        self.tensor_steps["native"] += len(items) - len(graphs)
        self.tensor_steps["graph"] += len(graphs)
        norms = gather(items, parts)
        return whole_norms(items, norms) if sharded else norms

    def run_sharded(
        self, items: list[Item], calls: list[native.LoopCall], graphs: list[tuple[int, Item]]
    ) -> StepNorms:
        """Grafting on shards (graft/optim/sharded.py): every state advances and gives its
        shard's norms, one all-reduce makes them the whole tensors', then every shard moves
        by its tensor's ratio (per tensor, or over all tensors)."""
        parts = [Part.of_call(call, call.advance()) for call in calls]
        if graphs:
            norms = [self.norms_pass(*graph_arguments(item)) for _, item in graphs]
            parts.append(Part.of_graphs(graphs, norms))
        norms = whole_norms(items, gather(items, parts))
        eps = torch.tensor([item.eps for item in items], dtype=torch.float64)
        magnitude, direction = norms.magnitude.double().cpu(), norms.direction.double().cpu()
        if self.granularity == "global":
            magnitude, direction = (
                torch.linalg.vector_norm(side).expand(len(items)) for side in (magnitude, direction)
            )
        ratios = grafting_ratio(magnitude, direction, eps)
        for call in calls:
            call.apply(ratios[call.indices])
        for index, item in graphs:
            dtype = torch.promote_types(item.param.dtype, torch.float32)
            scale = ratios[index].to(item.param.device, dtype)
            self.apply_pass(
                item.param, item.grad, item.d_state, item.d_packed, item.direction, scale
            )
        return norms

    def step_whole(self, graft: GraftLike, tensors: int) -> StepNorms | None:
        """The whole-step graph, compiled at its first call: nothing has moved if that
        fails (tracing and compiling precede every kernel), so the step then runs eagerly."""
        try:
            norms = self.whole_step(graft)
        except Exception as error:  # any failure to compile means: step eagerly
            self.fail(reason(error))
            return None
        self.steps += 1
        self.tensor_steps["whole"] += tensors
        return norms

    def run_global(
        self, calls: list[native.LoopCall], graphs: list[tuple[int, Item]]
    ) -> list[Part]:
        """Both passes of global grafting: every norm, then every weight moves."""
        parts = [Part.of_call(call, call.advance()) for call in calls]
        if graphs:
            norms = [self.norms_pass(*graph_arguments(item)) for _, item in graphs]
            parts.append(Part.of_graphs(graphs, norms))
        if not parts:
            return parts
        device = graphs[0][1].param.device if graphs else calls[0].params[0].device
        total_m, total_d = (
            torch.linalg.vector_norm(
                torch.cat([getattr(part, side).to(device, torch.float64) for part in parts])
            )
            for side in ("magnitude", "direction")
        )
        ratios: dict[float, Tensor] = {}  # the global ratio per eps
        for eps in {call.eps for call in calls} | {item.eps for _, item in graphs}:
            ratios[eps] = grafting_ratio(total_m, total_d, eps)
        for call in calls:
            ratio = ratios[call.eps].item()
            call.apply(torch.full((len(call.params),), ratio, dtype=torch.float64))
        for _, item in graphs:
            # in the norms' precision, as the graph was compiled (CompiledStep.compile)
            dtype = torch.promote_types(item.param.dtype, torch.float32)
            scale = ratios[item.eps].to(item.param.device, dtype)
            self.apply_pass(
                item.param, item.grad, item.d_state, item.d_packed, item.direction, scale
            )
        return parts

    def load_native(self) -> bool:
        """Build or load the native loops; False (and a warning) if they cannot be built."""
        why = native.build()
        if why is not None:  # no compiler, no ninja: step eagerly
            self.fail(why)
            return False
        return True

    def fail(self, why: str) -> None:
        self.failed = why
        warnings.warn(
            f"Graft(compile=True): cannot compile the step here ({self.failed}); stepping eagerly",
            stacklevel=7,  # the caller of optimizer.step()
        )

    def items(self, graft: GraftLike, sharded: bool) -> list[Item] | None:
        """Every tensor with a gradient, as graph arguments (of this rank's shards, for a
        sharded one); None if the step must be eager."""
        items = []
        for group in graft.param_groups:
            m_role = Role.of(group["magnitude"], group["lr"])
            d_role = Role.of(group["direction"]) if graft.grafting() else None
            sides: dict[int, tuple[Side, Side | None]] = {}  # flags depend on ndim only
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse or param.is_complex():
                    return None  # the eager step raises the error
                state = graft.state.get(param, {})
                m_state, d_state = state.get("magnitude", {}), state.get("direction", {})
                if not (
                    m_role.keys <= set(m_state) and (d_role is None or d_role.keys <= set(d_state))
                ):
                    return None  # a first step: the eager rules create the state
                if sharded and (m_role.rule.takes_norms or (d_role and d_role.rule.takes_norms)):
                    self.warn_sharded()
                    return None  # LARS's and LAMB's graphs take norms of whole tensors
                views = self.views_of(param, m_state, d_state)
                shard = local(param)
                grad_view = flat(local(grad)) if same_layout(local(grad), shard) else None
                if views is None or grad_view is None:
                    self.warn_layout(param)
                    return None
                if param.dim() not in sides:
                    sides[param.dim()] = (m_role.side(param), d_role and d_role.side(param))
                items.append(
                    Item(
                        param,
                        views.param,
                        grad_view,
                        views.m_state,
                        views.d_state,
                        m_role,
                        d_role,
                        *sides[param.dim()],
                        (m_state.get("step"), d_state.get("step")),
                        group["eps"],
                    )
                )
        return items

    def views_of(self, param: Tensor, m_state: dict, d_state: dict) -> Views | None:
        """The parameter's flat views, made once and reused while its storage and state
        tensors stay the same; None for a layout the graphs do not take."""
        states = tuple(v for s in (m_state, d_state) for k, v in s.items() if k != "step")
        cached = self.views.get(param)
        shard = local(param)
        if (
            cached is not None
            and cached.data_ptr == shard.data_ptr()
            and len(cached.states) == len(states)
            and all(a is b for a, b in zip(cached.states, states, strict=True))
        ):
            return cached
        tensors = [shard, *(local(state) for state in states)]
        # Detached: the graphs see plain tensors (a parameter's requires_grad would be guarded).
        flats = [flat(t.detach()) if same_layout(t, shard) else None for t in tensors]
        if any(view is None for view in flats):
            return None
        state_views = iter(flats[1:])

        def flat_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return {key: next(state_views) for key in state if key != "step"}

        views = Views(shard.data_ptr(), states, flats[0], flat_state(m_state), flat_state(d_state))
        self.views[param] = views
        return views

    def warn_layout(self, param: Tensor) -> None:
        if not self.warned_layout:
            warnings.warn(
                f"Graft(compile=True): a parameter of shape {tuple(param.shape)} has a memory "
                "layout the compiled step does not take (weight, gradient and state must share "
                "a contiguous or channels_last layout); stepping eagerly",
                stacklevel=8,  # the caller of optimizer.step()
            )
            self.warned_layout = True

    def warn_sharded(self) -> None:
        """Once: LARS's and LAMB's graphs take whole tensors' norms, so on shards they step
        eagerly (graft/optim/sharded.py)."""
        if not self.warned_sharded:
            warnings.warn(
                "Graft(compile=True): LARS and LAMB take norms of whole tensors inside their "
                "compiled step, and these parameters are sharded (DTensors); stepping eagerly "
                "on the shards",
                stacklevel=7,  # the caller of optimizer.step()
            )
            self.warned_sharded = True

    def compile(self, items: list[Item]) -> bool:
        """Compile each item's graphs on a scratch copy; False (and a warning) on failure."""
        for item in items:
            copy = scratch(item)
            try:
                if self.granularity == "global" and item.direction is not None:
                    self.norms_pass(*graph_arguments(copy))
                    # the global ratio, in the norms' precision as in run_global
                    dtype = torch.promote_types(copy.param.dtype, torch.float32)
                    one = copy.param.new_ones((), dtype=dtype)
                    self.apply_pass(
                        copy.param, copy.grad, copy.d_state, copy.d_packed, copy.direction, one
                    )
                else:
                    self.tensor_step(*graph_arguments(copy))
            except Exception as error:  # any failure to compile means: step eagerly
                self.fail(reason(error))
                return False
            self.compiled.add(signature(item))
        return True


def whole_step_tensors(graft: GraftLike) -> int | None:
    """How many tensors the whole-step graph would step: all of the Graft's tensors with a
    gradient, when they are all on a WHOLE_STEP_DEVICES device and have taken their first
    (eager) step; else None (other paths, or eager)."""
    count = 0
    for group in graft.param_groups:
        params = [param for param in group["params"] if param.grad is not None]
        if any(param.device.type not in WHOLE_STEP_DEVICES for param in params):
            return None  # checked first: on a CPU this is every step's answer
        if any(param.grad.is_sparse or param.is_complex() for param in params):
            return None  # the eager step raises the error
        m_keys = Role.of(group["magnitude"], group["lr"]).keys
        d_keys = Role.of(group["direction"]).keys if graft.grafting() else set()
        for param in params:
            state = graft.state.get(param, {})
            if not (
                m_keys <= set(state.get("magnitude", {}))
                and d_keys <= set(state.get("direction", {}))
            ):
                return None  # a first step: the eager rules create the state
            count += 1
    return count or None


def pack_scalars(items: list[Item]) -> None:
    """Advance every step count, then give each graph item its roles' scalars at its step:
    one small tensor per role, step, dtype and device, shared by the items alike."""
    counters = [step for item in items for step in item.steps if step is not None]
    if counters:
        torch._foreach_add_(counters, 1)
    values = iter(torch.stack(counters).tolist() if counters else [])
    cache: dict[tuple, Tensor] = {}
    for item in items:
        item.m_at, item.d_at = (None if step is None else next(values) for step in item.steps)
        if item.native:
            continue  # the native loops take the scalars as float64 rows (native.calls)
        item.m_packed = cached_pack(cache, item.m_role, item.m_at, item.param)
        if item.d_role is not None:
            item.d_packed = cached_pack(cache, item.d_role, item.d_at, item.param)


def cached_pack(cache: dict, role: Role, step: float | None, param: Tensor) -> Tensor:
    key = (id(role), step, param.dtype, param.device)
    if key not in cache:
        cache[key] = pack(role, 1.0 if step is None else step, param)
    return cache[key]


@dataclass
class Part:
    """Some of a step's norms: ‖u_M‖ and ‖u_D‖ of the items at `indices`."""

    indices: list[int]
    magnitude: Tensor
    direction: Tensor

    @classmethod
    def of_call(cls, call: native.LoopCall, norms: Tensor) -> Part:
        return cls(call.indices, norms[:, 0], norms[:, 1])

    @classmethod
    def of_graphs(cls, graphs: list[tuple[int, Item]], norms: list[tuple[Tensor, Tensor]]):
        device = graphs[0][1].param.device
        magnitude, direction = (
            torch.stack([value.to(device) for value in column])
            for column in zip(*norms, strict=True)
        )
        return cls([index for index, _ in graphs], magnitude, direction)


def whole_norms(items: list[Item], norms: StepNorms) -> StepNorms:
    """The shards' norms as their whole tensors': one all-reduce (per mesh) for all."""
    wheres = [sharding(item.parameter) for item in items]
    if not any(wheres):
        return norms
    squares = torch.cat([norms.magnitude, norms.direction]).square()
    magnitude, direction = whole_squares(squares, wheres * 2).sqrt().chunk(2)
    return StepNorms(norms.params, magnitude, direction)


def gather(items: list[Item], parts: list[Part]) -> StepNorms:
    """The parts' norms in the items' order, on the first parameter's device, in the
    precision of the eager norms (fp32, fp64 if any parameter is fp64)."""
    params = [item.parameter for item in items]
    if not params:
        return StepNorms(params, torch.zeros(0), torch.zeros(0))
    device = params[0].device
    dtype = torch.float32
    for param in params:
        dtype = torch.promote_types(dtype, param.dtype)
    magnitude, direction = (
        torch.cat([getattr(part, side).to(device, dtype) for part in parts])
        for side in ("magnitude", "direction")
    )
    order = [index for part in parts for index in part.indices]
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        magnitude, direction = magnitude[inverse.to(device)], direction[inverse.to(device)]
    return StepNorms(params, magnitude, direction)
