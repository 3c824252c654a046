"""Graft's compiled CPU step in hand-written loops (loops.cpp), for SGD, Adam, AdamW and
AdaGrad: the rules whose update is pointwise.

Inductor's loops for a grafted step compute each update twice and cannot keep the
states' stores in the loop that sums the norms (docs/benchmarks.md). These loops do:
`advance` advances both states and sums both updates' squares, block by block while the
gradient's block is in cache, and returns the norms; `apply` adds each tensor's update
scaled by its grafting ratio (graft/optim/combine.py), from D's advanced state.

The loops read each rule's scalars and flags by the names loops.cpp declares next to
them; `loop_names` checks those names against the Python rules' `scalars` and `flags` on
first use and raises LoopNamesError on any difference, and the rows sent to the loops are
built by name, so no order is shared between the two languages.

torch.utils.cpp_extension builds the source once per machine, with the vector
instructions torch detects on this CPU, into TORCH_EXTENSIONS_DIR (by default
~/.cache/torch_extensions): about 12 s on 2 cores the first time; later processes load
the cached build. A tensor is stepped here when it is on the CPU, float32 or float64, and
both its rules are listed in LOOPS; CompiledStep sends every other tensor to inductor.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from graft.optim.combine import grafting_ratio
from graft.optim.compiled_items import Item, Role, Side
from graft.optim.rules import RULES, Rule

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("loops.cpp")
# Rule name -> (the loops in loops.cpp, the state it reads, in the loops' order).
ADAM_LOOPS = ("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
LOOPS = {
    "sgd": ("sgd", ("momentum_buffer",)),
    "adam": ADAM_LOOPS,
    "adamw": ADAM_LOOPS,  # AdamW is Adam with its decoupled-decay flag set
    "adagrad": ("adagrad", ("sum", "momentum_buffer")),
}
# The flag the loops take apart from the rule's others: the gradient's sign.
SIGN_FLAG = "maximize"
DTYPES = (torch.float32, torch.float64)
# Vector instructions per CPU capability torch reports (torch.backends.cpu).
VECTOR_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def extension() -> ModuleType:
    """The built loops (built on first call; raises if they cannot be built here)."""
    # cpp_extension logs at import that a CPU-only machine has no CUDA runtime: true, and
    # beside the point here.
    import_log = logging.getLogger("torch.utils.cpp_extension")
    level = import_log.level
    import_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        import_log.setLevel(level)

    capability = torch.backends.cpu.get_cpu_capability()
    # A build per capability and torch install: a shared home directory never hands a CPU
    # instructions it lacks, nor one environment's build to another (or rebuilds in turn).
    install = f"{torch.__version__} {Path(torch.__file__).parent}"
    key = hashlib.sha256(install.encode()).hexdigest()[:8]
    log.info("loading Graft's native CPU loops (built once per machine, about 12 s)")
    return cpp_extension.load(
        name=f"graft_native_loops_{capability.lower()}_{key}",
        sources=[str(SOURCE)],
        # no errno from sqrt: it would keep the loops from vectorizing
        extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *VECTOR_FLAGS.get(capability, [])],
        extra_ldflags=["-fopenmp"],  # torch's own OpenMP runtime, already loaded
    )


@torch.compiler.disable  # under torch.compile(opt.step): a build, not a graph to trace
def build() -> str | None:
    """Build or load the loops; None if they are ready, else why not (one line).

    Raises LoopNamesError if the loops and the Python rules disagree on a name: a bug to
    fix, not a machine to fall back to eager steps on.
    """
    try:
        extension()
    except Exception as error:  # any failure to build means: step eagerly
        return failure(error)
    loop_names()
    return None


def failure(error: BaseException) -> str:
    """Why the loops could not be built, on one line: what failed and the build's first
    error (cpp_extension's message starts with the whole compiler command)."""
    lines = str(error).strip().splitlines() or [""]
    causes = [line.strip() for line in lines[1:] if "error:" in line or "not found" in line]
    if causes:
        return f"{lines[0].split(':')[0]}: {causes[0]}"
    return f"{type(error).__name__}: {lines[0]}"


class LoopNamesError(RuntimeError):
    """The native loops and a Python rule name its scalars or flags differently."""


@dataclass(frozen=True)
class LoopNames:
    """What one rule's loops read, as loops.cpp declares it: `scalars`, the row they take
    per tensor, in order; `ignored`, the rule's scalars they do not read; `flags`, their
    compile-time choices, in order (the rule's SIGN_FLAG comes apart)."""

    scalars: tuple[str, ...]
    ignored: tuple[str, ...]
    flags: tuple[str, ...]


@functools.cache
def loop_names() -> dict[str, LoopNames]:
    """Each loop's names (from the built loops), checked against every rule in LOOPS."""
    declared = {
        loops: LoopNames(*(tuple(names) for names in lists))
        for loops, lists in extension().names().items()
    }
    for name, (loops, _) in LOOPS.items():
        check_names(RULES[name], declared[loops])
    return declared


def check_names(rule: type[Rule], names: LoopNames) -> None:
    """Raise LoopNamesError unless the rule's scalars are exactly those the loops read or
    ignore, and its flags those they take (the names do not depend on the values)."""
    hyper = dict(rule.defaults)
    for what, python, native in (
        ("scalars", set(rule.scalars(hyper, 1.0)), {*names.scalars, *names.ignored}),
        ("flags", set(rule.flags(hyper, torch.empty(0))), {*names.flags, SIGN_FLAG}),
    ):
        if python != native:
            raise LoopNamesError(
                f"the native loops for '{rule.name}' ({SOURCE.name}) read {what} "
                f"{sorted(native)}, {rule.__name__}.{what} gives {sorted(python)} "
                f"(missing from the rule: {sorted(native - python)}; unknown to the loops: "
                f"{sorted(python - native)}); rename one side to match the other"
            )


def takes(item: Item) -> bool:
    """Whether these loops step this tensor."""
    return (
        item.param.device.type == "cpu"
        and item.param.dtype in DTYPES
        and item.m_role.rule.name in LOOPS
        and (item.d_role is None or item.d_role.rule.name in LOOPS)
    )


@dataclass
class LoopCall:
    """Tensors the loops step in one call: the same rules' flags, dtype and eps. `indices`
    are their positions in the step's items; `magnitude` and `direction` are the sides as
    loops.cpp takes them (`side`)."""

    indices: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    magnitude: tuple
    direction: tuple | None
    eps: float

    @torch.compiler.disable  # under torch.compile(opt.step): calls into C++, not graphs
    def advance(self) -> Tensor:
        """Advance both states; ‖u_M‖ and ‖u_D‖ per tensor, float64 [n, 2] on the CPU."""
        return extension().advance(self.params, self.grads, self.magnitude, self.direction)

    @torch.compiler.disable
    def apply(self, ratios: Tensor) -> None:
        """Add ratios[i] · u_D to tensor i (u_M without a direction), u recomputed from the
        advanced state. ratios: float64 [n] on the CPU."""
        side = self.magnitude if self.direction is None else self.direction
        extension().apply(self.params, self.grads, side, ratios)

    def step(self) -> Tensor:
        """Per-tensor grafting (or M alone): advance, then add each tensor's grafted update.
        Returns the norms, as `advance`."""
        norms = self.advance()
        if self.direction is None:
            self.apply(torch.ones(len(self.params), dtype=torch.float64))
        else:
            self.apply(grafting_ratio(norms[:, 0], norms[:, 1], self.eps))
        return norms


@torch.compiler.disable  # host work: rows of scalars for the loops
def calls(items: Iterable[tuple[int, Item]]) -> list[LoopCall]:
    """The (position, item) pairs grouped into calls; items' step counts already advanced."""
    groups: dict[tuple, list[tuple[int, Item]]] = {}
    for index, item in items:
        key = (item.magnitude, item.direction, item.param.dtype, item.eps)
        groups.setdefault(key, []).append((index, item))
    rows: dict[tuple, list[float]] = {}
    out = []
    for (magnitude, direction, _, eps), members in groups.items():
        chosen = [item for _, item in members]
        out.append(
            LoopCall(
                [index for index, _ in members],
                [item.param for item in chosen],
                [item.grad for item in chosen],
                side(magnitude, [(i.m_role, i.m_state, i.m_at) for i in chosen], rows),
                None
                if direction is None
                else side(direction, [(i.d_role, i.d_state, i.d_at) for i in chosen], rows),
                eps,
            )
        )
    return out


def side(shared: Side, members: list[tuple[Role, dict[str, Tensor], Any]], rows: dict) -> tuple:
    """One role over a call, as loops.cpp takes it: (loops, flags, maximize, states,
    scalars), flags and scalars by the loops' names. shared: the rule and flags of every
    member; members: each tensor's role (for its hyperparameters), state views and step
    count; rows: scalar rows computed so far."""
    loops, order = LOOPS[shared.rule.name]
    names = loop_names()[loops]
    flags = dict(shared.flags)
    states = [state[key] for _, state, _ in members for key in order if key in state]
    scalars = []
    for role, _, step in members:
        key = (id(role), step)
        if key not in rows:
            values = role.scalars(step)
            rows[key] = [values[name] for name in names.scalars]
        scalars.append(rows[key])
    return (
        loops,
        [flags[name] for name in names.flags],
        flags[SIGN_FLAG],
        states,
        torch.tensor(scalars, dtype=torch.float64),
    )
