"""Writing results: never fewer finished runs than before, never half-written, never a guess.

A results folder (`results/<experiment>/`, or `results/<experiment>-tuned/` for a grid whose
learning rates graft-grid --tune chose) is replaced as a whole: the new one is built in a hidden
folder beside it and renamed into place, so a failure while building leaves the old one as it
was. It is not replaced by one holding fewer finished runs than it does now (a fresh clone has
the committed results and no runs), nor a tuned one by untuned results or the other way round,
unless the user passes --force.

Single output files (graft-compare's) are written under temporary names and renamed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from graft.common.errors import UserError
from graft.grid.experiment import TUNED_SUFFIX

RESULTS = Path(__file__).resolve().parents[2] / "results"
OUTPUTS = Path("outputs")  # the runs, under the current folder


def results_folder(root: Path, name: str, tuned: bool) -> Path:
    """results/<name>/ for the experiment file's learning rates, results/<name>-tuned/ for the
    ones graft-grid --tune chose (outputs/<name>/tuned/)."""
    return root / (name + TUNED_SUFFIX if tuned else name)


def finished_in(folder: Path) -> int | None:
    """How many finished runs a results folder holds: the runs in its provenance.json (grids
    and studies both write it), else the seeds column of its table.csv; 0 for a folder that
    is absent or empty; None when it holds files but neither count can be read."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return 0
    try:
        runs = json.loads((folder / "provenance.json").read_text())["runs"]
        if isinstance(runs, Mapping):
            return len(runs)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with open(folder / "table.csv", newline="") as handle:
            seeds: dict[tuple[str, str], int] = {}
            for row in csv.DictReader(handle):
                cell = (row["magnitude"], row["direction"])
                seeds[cell] = max(seeds.get(cell, 0), int(row["seeds"] or 0))
        return sum(seeds.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tuned_in(folder: Path) -> bool | None:
    """Whether a results folder holds tuned results: its provenance says so, or its runs lie
    under outputs/<name>/tuned/ (folders written before provenance said), or it has a
    tuning.md; None when there is nothing to tell by."""
    try:
        provenance = json.loads((folder / "provenance.json").read_text())
        if isinstance(provenance.get("tuned"), bool):
            return provenance["tuned"]
        runs = list(provenance["runs"])
        if runs:
            return any("/tuned/" in run for run in runs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return True if (folder / "tuning.md").exists() else None


def refuse_to_shrink(
    folder: Path, finished: int, total: int, *, tuned: bool, force: bool, redo: str
) -> None:
    """UserError unless `folder` may be replaced by results of `finished` of `total` runs:
    it holds no more finished runs, and the same kind (tuned or not). `redo`: the command that
    replaces it anyway, before --force."""
    if force:
        return
    held = finished_in(folder)
    if held is None:
        raise UserError(
            f"{folder} holds files but no readable provenance.json or table.csv to count its "
            f"finished runs; not replaced: move it away, or {redo} --force"
        )
    if held > finished:
        raise UserError(
            f"{folder} holds {held} finished runs, the new results {finished} of {total}; not "
            f"replaced: finish the runs, or {redo} --force to replace it"
        )
    held_tuned = tuned_in(folder) if held else None
    if held_tuned is not None and held_tuned != tuned:
        kinds = ("untuned", "tuned") if tuned else ("tuned", "untuned")
        raise UserError(
            f"{folder} holds {kinds[0]} results and these are {kinds[1]}; not replaced: move it "
            f"to {folder.parent / (folder.name + TUNED_SUFFIX) if held_tuned else folder}, or "
            f"{redo} --force"
        )


def check_writable(path: Path, what: str) -> None:
    """UserError (one line) unless a folder `path` can be created or replaced: it is not a
    file, the nearest existing folder above it is a folder, and a folder can be made there.
    Checked before the work that would write it (a grid's runs) begins."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; move it away or choose another")
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{what} {path}: {above} is a file, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graft-probe-", dir=above))
    except OSError as error:
        raise UserError(f"{what} {path}: cannot write in {above} ({error.strerror})") from None


def replace_folder(target: Path, build: Callable[[Path], None], keep: Iterable[str] = ()) -> None:
    """Build the new `target` with `build(folder)` in a hidden folder beside it, copy over the
    files of the old one named in `keep` that `build` did not write, and rename it into place.
    On any failure the old `target` is as it was and nothing of the new one is left."""
    check_writable(target, "results folder")
    made = first_missing(target.parent)
    building = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
        build(building)
        for name in keep:
            if (target / name).is_file() and not (building / name).exists():
                shutil.copy2(target / name, building / name)
        os.chmod(building, 0o777 & ~current_umask())  # mkdtemp's 0700 is not a results folder's
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
            try:
                os.rename(building, target)
            except OSError:
                os.rename(old / target.name, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(building, target)
    except OSError as error:
        clean_up(building, made)
        raise UserError(
            f"could not write {target} ({error.strerror}: {error.filename}); "
            "nothing there was changed"
        ) from None
    except BaseException:
        clean_up(building, made)
        raise


def write_files(folder: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Write each file of `folder` (name -> writer(temporary path)) under a temporary name,
    then rename them all into place; on failure none of them is left half-written."""
    check_writable(folder, "output folder")
    made = first_missing(folder)
    temporaries: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            handle, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=Path(name).suffix, dir=folder
            )
            os.close(handle)
            temporaries.append(Path(temporary))
            write(Path(temporary))
            os.chmod(temporary, 0o666 & ~current_umask())
        for temporary, name in zip(temporaries, writers):
            os.replace(temporary, folder / name)
    except BaseException as error:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        clean_up(None, made)
        if isinstance(error, OSError):
            raise UserError(
                f"cannot write in {folder} ({error.strerror}: {error.filename})"
            ) from None
        raise


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (to remove on failure)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def clean_up(building: Path | None, made: Path | None) -> None:
    if building is not None:
        shutil.rmtree(building, ignore_errors=True)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
