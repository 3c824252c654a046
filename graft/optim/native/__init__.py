"""Graft's compiled CPU step in hand-written loops (fused_step.cpp), for SGD, Adam, AdamW
and AdaGrad: the rules whose update is pointwise.

Inductor's loops for a grafted step compute each update twice and cannot keep the
states' stores in the loop that sums the norms (docs/benchmarks.md). These loops do:
the first advances both states and sums both updates' squares, block by block while the
gradient's block is in cache; the second adds the grafted update from D's advanced state.

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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from graft.optim.compiled import Item, Role, Side

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_step.cpp")
# Rule name -> (the loops in fused_step.cpp, the state it reads, in the loops' order).
ADAM_LOOPS = ("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
LOOPS = {
    "sgd": ("sgd", ("momentum_buffer",)),
    "adam": ADAM_LOOPS,
    "adamw": ADAM_LOOPS,  # AdamW is Adam with its decoupled-decay flag set
    "adagrad": ("adagrad", ("sum", "momentum_buffer")),
}
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
    log.info("loading Graft's fused CPU step (built once per machine, about 12 s)")
    return cpp_extension.load(
        name=f"graft_fused_step_{capability.lower()}_{key}",
        sources=[str(SOURCE)],
        # no errno from sqrt: it would keep the loops from vectorizing
        extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *VECTOR_FLAGS.get(capability, [])],
        extra_ldflags=["-fopenmp"],  # torch's own OpenMP runtime, already loaded
    )


@torch.compiler.disable  # under torch.compile(opt.step): a build, not a graph to trace
def build() -> str | None:
    """Build or load the loops; None if they are ready, else why not (one line)."""
    try:
        extension()
    except Exception as error:  # any failure to build means: step eagerly
        return failure(error)
    return None


def failure(error: BaseException) -> str:
    """Why the loops could not be built, on one line: what failed and the build's first
    error (cpp_extension's message starts with the whole compiler command)."""
    lines = str(error).strip().splitlines() or [""]
    causes = [line.strip() for line in lines[1:] if "error:" in line or "not found" in line]
    if causes:
        return f"{lines[0].split(':')[0]}: {causes[0]}"
    return f"{type(error).__name__}: {lines[0]}"


def takes(item: Item) -> bool:
    """Whether these loops step this tensor."""
    return (
        item.param.device.type == "cpu"
        and item.param.dtype in DTYPES
        and item.m_role.rule.name in LOOPS
        and (item.d_role is None or item.d_role.rule.name in LOOPS)
    )


@dataclass
class Batch:
    """Tensors stepped by one call: the same rules' flags, dtype and eps. `indices` are
    their positions in the step's items."""

    indices: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    magnitude: tuple
    direction: tuple | None
    eps: float

    def advance(self, apply: bool) -> Tensor:
        """Advance both states; with `apply`, also add each tensor's grafted update (or
        M's without a direction). Returns ‖u_M‖ and ‖u_D‖ per tensor, float64 [n, 2]."""
        return extension().advance(
            self.params, self.grads, self.magnitude, self.direction, self.eps, apply
        )

    def apply(self, ratio: float) -> None:
        """Add ratio · u_D to each tensor, u_D from D's advanced state."""
        extension().apply(self.params, self.grads, self.direction, ratio)


def batches(items: Iterable[tuple[int, Item]]) -> list[Batch]:
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
            Batch(
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
    """One role over a batch, as fused_step.cpp takes it: (loops, flags, states, scalars).
    shared: the rule and flags of every member; members: each tensor's role (for its
    hyperparameters), state views and step count; rows: scalar rows computed so far."""
    loops, order = LOOPS[shared.rule.name]
    states = [state[key] for _, state, _ in members for key in order if key in state]
    scalars = []
    for role, _, step in members:
        key = (id(role), step)
        if key not in rows:
            rows[key] = list(role.rule.scalars(role.hyper, 1.0 if step is None else step).values())
        scalars.append(rows[key])
    return loops, list(shared.flags), states, torch.tensor(scalars, dtype=torch.float64)
