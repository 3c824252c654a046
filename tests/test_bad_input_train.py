"""graft-train's catalogue of user mistakes: each is exit code 2 and one line naming the bad
value, and leaves every file it could touch byte-identical (nothing written, nothing lost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graft.train import cli
from tests.refusals import assert_refused, read_only, tree_hashes

# A few fast steps of the default cell; each case adds its mistake.
TINY = [
    "logger=none",
    "trainer.batch_size=16",
    "trainer.max_steps=2",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=1",
    "trainer.progress=false",
]


def assert_one_line_refusal(code: int | None, stderr: str, bad: str) -> None:
    """For a refusal in a fresh process: exit 2, one line `graft-train: error:` naming bad."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("graft-train: error: "), stderr
    assert bad in lines[0], lines[0]


# (overrides, the text the one line must hold): caught before Hydra starts the run.
BEFORE_HYDRA = [
    (["+trainer.max_step=5"], "+trainer.max_step=5 configures nothing"),
    (["+trainer.max_step=5"], "did you mean trainer.max_steps?"),
    (["+trainer.lr=0.1"], "trainer has no key 'lr'"),
    (["+task.model.width=3"], "+task.model.width=3 configures nothing"),
    (["+task.data.eval_fractio=0.1"], "did you mean task.data.eval_fraction?"),
    (["+magnitude.beta=0.9"], "magnitude has no key 'beta'"),
    (["+graft.granulrity=global"], "did you mean graft.granularity?"),
    (["+schedule.warmup=10"], "schedule has no key 'warmup'"),
    (["+logger.projct=x"], "logger has no key 'projct'"),
    (["+seed=3"], "the config has no key 'seed'"),
    (["+optimizers.adagrad.lr=0.1"], "optimizers.adagrad.* configures nothing"),
    (["+optimizers.adma.lr=0.1"], "optimizers.adma names no optimizer (did you mean adam?)"),
    (["+optimizers.adam.bet=1"], "unknown keyword 'bet' for 'adam'"),
    (["+optimizers.sgd.momentum=-1"], "momentum=-1"),
    (["+optimizers.adam=3"], "optimizers.adam=3 is not a mapping"),
    (["magnitude.betas=0.9"], "magnitude.betas=0.9 is a number, but magnitude.betas takes a list"),
    (["magnitude.betas=[0.9,x]"], "takes a list of numbers"),
    (["magnitude.betas=[0.9,1.0]"], "betas=(0.9, 1.0)"),
    (["task.data.eval_fraction=20%"], "task.data.eval_fraction=20% is a string"),
    (["trainer.max_steps=3.5"], "trainer.max_steps=3.5 is a fraction"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid"),
    (["trainer.bf16=yes"], "trainer.bf16=yes is a string, but trainer.bf16 takes true or false"),
    (["trainer.dtype=float16"], "trainer.dtype='float16' is invalid; allowed: float32 or float64"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0"),
    (["trainer.bf16=true", "trainer.fp16=true"], "trainer.bf16 and trainer.fp16"),
    (["trainer.batch_size=16", "trainer.micro_batch_size=5"], "trainer.micro_batch_size=5"),
    (["magnitude.lr=abc"], "magnitude.lr=abc is a string"),
    (["magnitude.lr=-1"], "lr=-1"),
    (["direction.momentum=-0.5"], "momentum=-0.5"),
    (["direction.nesterov=true", "direction.momentum=0"], "nesterov=True"),
    (["graft.granularity=layer"], "'layer'"),
    (["graft.eps=0"], "eps=0"),
    (["graft.compile=maybe"], "graft.compile=maybe is a string"),
    (["schedule=step_decay", "schedule.warmup_steps=500"], "schedule warmup_steps=500"),
    (["schedule=step_decay", "schedule.warmup_steps=500"], "set schedule.warmup_steps="),
    (["schedule.final_ratio=2"], "final_ratio=2"),
    (["schedule=step_decay", "schedule.milestones=[5,2]"], "milestones=[5, 2]"),
    (["schedule=nope"], "unknown schedule option 'nope'"),
    (["task=mnist"], "unknown task option 'mnist'"),
    (["optim@magnitude=adamx"], "unknown optim@magnitude option 'adamx'"),
    (["static=/no/such/multipliers.json"], "static=/no/such/multipliers.json: no such file"),
    (["graft=off", "schedule=replay", "schedule.run=/no/such/run"], "/no/such/run"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes'"),
    (["trainer.max_steps=["], "bad override"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not a device"),
    (["trainer.backend=mpi"], "trainer.backend='mpi' is unknown"),
    (["trainer.parallel=zero3"], "trainer.parallel='zero3'"),
    # A task's own schedule is checked before its data is scanned (no ImageNet here).
    (["task=imagenet_resnet50", "trainer.max_steps=100"], "task=imagenet_resnet50 sets the"),
    # A sweep is checked on its first job before any job starts.
    (["-m", "trainer.seed=0,1", "+trainer.foo=1"], "+trainer.foo=1 configures nothing"),
    (["-m", "magnitude.lr=0.1,abc"], "magnitude.lr=abc is a string"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "bad"), BEFORE_HYDRA)
def test_a_mistake_on_the_command_line_is_one_line_and_writes_nothing(
    overrides, bad, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("kept\n")
    assert_refused(cli.main, ["graft-train", *TINY, *overrides], bad, [tmp_path], capsys)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the run directory's parent would be\n")
    for run_dir in (blocker, blocker / "run"):
        argv = ["graft-train", *TINY, f"hydra.run.dir={run_dir}"]
        assert_refused(cli.main, argv, f"{blocker} is a file", [tmp_path], capsys)


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "read_only"
    folder.mkdir()
    (folder / "kept.txt").write_text("kept\n")
    with read_only(folder):
        argv = ["graft-train", *TINY, f"hydra.run.dir={folder / 'run'}"]
        assert_refused(cli.main, argv, f"cannot write in {folder}", [tmp_path], capsys)


def graft_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft.train", *TINY, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def finished_run(module_tmp) -> Path:
    """A finished 2-step run, with a checkpoint per step."""
    run_dir = module_tmp / "run"
    result = graft_train(run_dir.parent, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
def test_a_finished_run_given_another_config_is_refused_naming_the_keys(finished_run):
    before = tree_hashes([finished_run])
    result = graft_train(finished_run.parent, f"hydra.run.dir={finished_run}", "magnitude.lr=0.5")
    assert_one_line_refusal(result.returncode, result.stderr, "magnitude.lr: 0.001 -> 0.5")
    assert "holds a run with another config" in result.stderr
    assert tree_hashes([finished_run]) == before
    again = graft_train(finished_run.parent, f"hydra.run.dir={finished_run}")
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_run_whose_only_checkpoints_are_unreadable_is_refused(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    (run_dir / "summary.json").unlink()  # as if killed before it ended
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])  # torn
    before = tree_hashes([run_dir])
    result = graft_train(tmp_path, f"hydra.run.dir={run_dir}")
    bad = str(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])
    assert_one_line_refusal(result.returncode, result.stderr, bad)
    assert "to start it over, move" in result.stderr
    assert tree_hashes([run_dir]) == before  # metrics.jsonl not cut back, nothing rewritten


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        (["task.model.num_classes=5"], "task.model.num_classes=5 does not fit the data"),
        (["task.data.eval_fraction=1.5"], "task.data.eval_fraction=1.5"),
        (["task.kind=vision"], "unknown task.kind 'vision'; allowed: image_classification"),
        (["task.model.layers=[1,1]"], "task.model.layers=[1, 1] is invalid; allowed: four"),
        (
            ["task=imagenet_resnet50", "task.data.root=/no/such/imagenet"]
            + ["schedule.warmup_steps=0", "schedule.milestones=[]"],  # fit the 2 steps
            "task.data.root='/no/such/imagenet' has no train/ and val/ folders",
        ),
    ],
)
def test_a_model_or_split_that_does_not_fit_the_data_is_refused_at_build(tmp_path, overrides, bad):
    result = graft_train(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert_one_line_refusal(result.returncode, result.stderr, bad)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_diverged_run_has_true_timings_and_its_reason_on_disk(tmp_path):
    run_dir = tmp_path / "run"
    result = graft_train(
        tmp_path,
        f"hydra.run.dir={run_dir}",
        "optim@magnitude=sgd",
        "graft=off",
        "magnitude.lr=1e30",
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.checkpoint_every=0",
    )
    assert result.returncode == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["train_seconds"] > 0 and summary["samples_per_s"] < 1e7
    reason = (run_dir / "error.log").read_text().splitlines()[0]
    assert reason.startswith("non-finite training loss at step")
    assert "no checkpoint was written before it" in reason  # checkpoint_every=0: none exists
