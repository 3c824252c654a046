"""One run directory, one job: an OS lock on `run_dir/.lock`, held while the run trains.

The lock is `flock(2)`: the kernel drops it when its holder exits or is killed (kill -9, a lost
node), so a dead job never leaves a run directory stuck and there is no stale lock to delete.
The file stays, empty and never written (a run that is refused or has nothing to do changes
nothing in the folder); the holder is looked up in /proc/locks. Only the process that writes
takes it: global rank 0, or each process of a world of one (`srun python -m graft.train`
without torchrun starts independent processes: one trains, the others refuse).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from graft.common.errors import RunDirTaken, UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)

_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_forked_child() -> None:
    # A forked child (a DataLoader worker) shares the lock; closing its copy leaves the parent
    # as the only holder, so the lock goes when the parent goes, not when its workers do.
    for descriptor in _held:
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, *, writer: bool = True) -> Iterator[None]:
    """Hold run_dir's lock for the block (a process that does not write holds nothing).

    Raises UserError at once when another process holds it, naming the folder and the holder.
    """
    descriptor = lock(run_dir) if writer else None
    try:
        yield
    finally:
        if descriptor is not None:
            _held.discard(descriptor)
            os.close(descriptor)


def lock(run_dir: Path) -> int | None:
    """The locked descriptor of run_dir/.lock; None where nothing can be locked (a read-only
    folder, which no run can write either, or a file system without flock)."""
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno in READ_ONLY and run_dir.is_dir():
            return None  # read-only: nothing can be written here, by us or another job
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(
                f"{run_dir} is a file, not a run directory; move it away or pick another "
                "folder with hydra.run.dir=..."
            ) from None
        raise UserError(
            f"{run_dir} cannot hold a run ({error.strerror}: {error.filename or path}); "
            "pick another folder with hydra.run.dir=..."
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RunDirTaken(
            f"{run_dir} is in use by another job ({holder(path)}); wait for it to end or stop "
            "it, or pick another folder with hydra.run.dir=..."
        ) from None
    except OSError as error:  # e.g. a Lustre mount without the flock option
        os.close(descriptor)
        log.warning("cannot lock %s (%s): a second job on it would not be refused", path, error)
        return None
    _held.add(descriptor)
    return descriptor


def holder(path: Path) -> str:
    """Who holds path's flock: a process of this machine (from Linux's /proc/locks), or not."""
    try:
        status = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return "holder unknown"
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in locks.splitlines():
        fields = line.split()  # 1: FLOCK ADVISORY WRITE <pid> <major:minor:inode> 0 EOF
        if fields[1:2] == ["FLOCK"] and device in fields:
            return f"pid {fields[4]} on {socket.gethostname()}"
    return "not a process of this machine: another node?"
