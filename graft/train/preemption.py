"""Stopping early without losing steps: preemption, time limits, and a launcher that died.

Slurm sends SIGUSR2 `hydra.launcher.signal_delay_s` before a job's time limit, and schedulers
send SIGTERM before they kill a job. While the training loop runs, either signal only raises a
flag: at a step boundary every rank agrees to stop, the run writes the checkpoint of that step,
closes its logs and ends, and the same command (or the requeued job) resumes from it. Outside
the loop (building the data, the final save) there is nothing to save, so the signal does what it
did before: its default action, or the handler installed before graft's.

Under hydra-submitit-launcher that handler is submitit's, which requeues the job (and SIGTERM's,
which only logs). It is called once the checkpoint is written, so the job requeues as it always
did, without losing the steps since the last checkpoint. Elsewhere a run stopped by a signal
exits with 128 + the signal's number (143 for SIGTERM, 140 for SIGUSR2), what a shell reports
for a process that signal ended: not finished, yet neither a bad config (2) nor a failed run (1).

A torchrun worker also watches its launcher: when torchrun dies (kill -9, an out-of-memory kill)
its workers would train on as orphans, so each sends itself SIGTERM and stops the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from graft.train import distributed

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
LAUNCHER_POLL_S = 1.0  # how often a torchrun worker checks that torchrun is alive


class StopRequested(SystemExit):
    """The run stopped at `step` on a signal, its checkpoint written; exit code 128 + signum."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step


class StopSignals:
    """SIGTERM and SIGUSR2 handlers that note the first signal, installed while the loop runs."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}  # what each signal did before graft's handler
        self.installed = False
        self.received = 0  # the first stop signal's number; 0: none yet

    def install(self) -> None:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return  # installed already, or not in the main thread, where Python runs handlers
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self.note)
        self.installed = True

    def note(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def restore(self) -> None:
        if self.installed:
            for signum, previous in self.previous.items():
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            self.installed = False

    def hand_on(self, signum: int) -> None:
        """Call the handler that was there before graft's (submitit's requeues), if any."""
        previous = self.previous.get(signum)
        if callable(previous):
            log.info("%s: handing on to the handler set before graft's", name(signum))
            previous(signum, None)


_active: StopSignals | None = None  # the signals of the train() call in progress


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Around one run: the loop installs the handlers (at_step_boundaries), this restores them.

    A StopRequested from the loop restores them, hands the signal on to the handler that was
    there before (submitit's requeues the job and exits), and is raised again otherwise.
    """
    global _active
    signals = _active = StopSignals()
    watcher = watch_launcher()
    try:
        yield signals
    except StopRequested as stop:
        signals.restore()
        signals.hand_on(stop.signum)
        raise
    finally:
        signals.restore()
        _active = None
        if watcher is not None:
            watcher.set()


class StopCheck:
    """The loop's question at each step boundary: stop here? (the same answer on every rank)."""

    def __init__(self, signals: StopSignals | None) -> None:
        self.signals = signals
        self.pending: Callable[[], int] | None = None  # the vote posted at the last boundary
        self.signum = 0  # the signal this rank stops on
        if signals is not None:
            signals.install()

    def agreed(self, last: bool) -> bool:
        """Whether every rank stops at this boundary. With several ranks the signals are voted
        on (posted here, read at the next boundary: the vote runs during a step). At the last
        step the run finishes instead."""
        local = self.signals.received if self.signals is not None else 0
        if distributed.is_joined():
            voted = self.pending() if self.pending is not None else 0
            self.pending = None if voted or last else distributed.post_max(local)
        else:
            voted = local
        if voted and not last:
            self.signum = local or voted  # this rank's own signal says how it exits
            return True
        return False


def at_step_boundaries() -> StopCheck:
    """From here on (the training loop), a stop signal waits for the next step boundary."""
    return StopCheck(_active)


def watch_launcher() -> threading.Event | None:
    """Under torchrun: a thread that sends this process SIGTERM once torchrun is gone (its parent
    process changes); set the returned event to end it. None when torchrun did not start us."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    launcher = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(LAUNCHER_POLL_S):
            if os.getppid() != launcher:
                log.warning("the launcher (torchrun, pid %d) is gone: stopping", launcher)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="graft-launcher-watch", daemon=True).start()
    return done


def name(signum: int) -> str:
    return signal.Signals(signum).name
