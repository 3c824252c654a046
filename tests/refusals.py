"""Checking a refusal: a command's main() on bad input exits 2 with one line naming the bad
value, and leaves every file it could have touched as it was.

    assert_refused(main, ["graft-table", "nope"], "'nope'", [tmp_path], capsys)

runs `main()` in-process with sys.argv set (program name first), and asserts: SystemExit with
code 2; stderr is exactly one line, starting with `PROGRAM: error:` (PROGRAM: argv[0]) and
containing `bad`; nothing on stdout; and every file and folder under each of `roots` is
unchanged: the same paths, each file with the same sha256 (so nothing was written, removed or
left half-done). Missing roots count as empty and must stay missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest


def tree_hashes(roots: Sequence[Path]) -> dict[str, str]:
    """path -> sha256 of every file (and "dir" for every folder) under `roots`."""
    hashes = {}
    for root in roots:
        if not root.exists():
            continue
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                hashes[str(path)] = "dir"
            else:
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def assert_refused(
    main: Callable[[], None],
    argv: list[str],
    bad: str,
    roots: Sequence[Path],
    capsys: pytest.CaptureFixture[str],
) -> str:
    """Run main() with sys.argv = argv and check the refusal (see the module docstring); the
    error line."""
    before = tree_hashes(roots)
    capsys.readouterr()  # drop what came before
    saved = sys.argv
    sys.argv = list(argv)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert exit_info.value.code == 2, f"exit {exit_info.value.code}; stderr: {captured.err}"
    assert len(lines) == 1, f"stderr is not one line:\n{captured.err}"
    assert lines[0].startswith(f"{argv[0]}: error: "), lines[0]
    assert bad in lines[0], f"{bad!r} not named in: {lines[0]}"
    assert captured.out == "", f"stdout: {captured.out}"
    after = tree_hashes(roots)
    changed = sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )
    assert not changed, f"changed under {roots}: {changed[:5]}"
    return lines[0]


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` made unwritable for the test's duration: mode 0o555, and the immutable
    attribute too when running as root (which ignores modes); skips the test where neither
    holds."""
    mode = folder.stat().st_mode
    folder.chmod(stat.S_IMODE(mode) & 0o555)
    immutable = False
    try:
        if os.geteuid() == 0:
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode:
                pytest.skip("running as root without chattr +i: no folder is read-only")
            immutable = True
        yield folder
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr") or "chattr", "-i", str(folder)], check=True)
        folder.chmod(stat.S_IMODE(mode))
