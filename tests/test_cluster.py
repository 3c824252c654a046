"""A real cluster's conditions, with real processes and signals: one job per run directory,
preemption signals, a preset MASTER_PORT, per-task GPU binding, data prepared once, and
workers that stop when their launcher dies."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from graft.common.errors import UserError
from graft.train import distributed, preemption, run_lock
from graft.train.checkpoints import saved_checkpoints
from graft.train.cli import main
from graft.train.config import CONFIGS, register_resolvers
from graft.train.loop import train
from graft.train.metrics import read_metrics
from tests.runs import TINY, config, train_in_process

# 30 small steps, evaluated twice; checkpoints only at the end, so a stop's checkpoint is the
# only one in between.
RUN = [
    "trainer.max_steps=30",
    "trainer.eval_every=20",
    "trainer.checkpoint_every=0",
    "trainer.log_norms_every=0",
]
# The real CLI with each training step slowed down, so a signal sent after the first step
# always lands mid-run, however fast the machine.
SLOW_CLI = (
    "import sys, time\n"
    "from graft.train import loop\n"
    "step, seconds = loop.train_step, float(sys.argv.pop(1))\n"
    "loop.train_step = lambda run: (time.sleep(seconds), step(run))[1]\n"
    "from graft.train.cli import main\n"
    "main()\n"
)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process runs use one thread too


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like the subprocesses: the same CPU kernels, bit for bit
    (and no oversubscription of a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def slow_cli(run_dir: Path, *overrides: str, step_s: float = 0.3) -> subprocess.Popen:
    command = [sys.executable, "-c", SLOW_CLI, str(step_s), *TINY, *overrides]
    command.append(f"hydra.run.dir={run_dir}")
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as log:  # the child keeps it open
        return subprocess.Popen(command, cwd=run_dir.parent, env=ONE_THREAD, stdout=log, stderr=log)


def output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text()


def wait_for(condition, what: str, job: subprocess.Popen | None = None, timeout_s=120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert job is None or job.poll() is None, f"exited ({job.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def steps_logged(run_dir: Path) -> list[int]:
    return [line["step"] for line in read_metrics(run_dir / "metrics.jsonl")]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(path.stem.split("_")[1]) for path in saved_checkpoints(run_dir / "checkpoints")]


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "train/samples_per_s"} for line in lines]


@pytest.fixture
def environment(monkeypatch):
    """os.environ as it was, after a test whose code exports variables (RANK, MASTER_PORT ...)
    that monkeypatch never set: a later test's processes would inherit them."""
    saved = dict(os.environ)
    yield os.environ
    monkeypatch.undo()  # first: it would put back what the code exported after a delenv
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def uninterrupted(module_tmp) -> Path:
    run_dir = module_tmp / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_in_process(run_dir, *RUN) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


# One run directory, one job.


@pytest.mark.slow
def test_a_second_job_on_a_run_directory_refuses_at_once_and_a_killed_one_leaves_no_lock(
    tmp_path, capsys, monkeypatch, one_thread
):
    run_dir = tmp_path / "run"
    overrides = [*RUN, "trainer.max_steps=12", "trainer.checkpoint_every=2"]
    first = slow_cli(run_dir, *overrides, step_s=1.0)
    wait_for(lambda: checkpoint_steps(run_dir), "the first checkpoint", first)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run: its files cannot change under us
    try:
        before = hashes(run_dir)
        monkeypatch.setattr(sys, "argv", ["graft-train", *TINY, *overrides])
        sys.argv.append(f"hydra.run.dir={run_dir}")
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"graft-train: error: {run_dir} is in use by another job")
        assert f"pid {first.pid} on " in lines[0] and "hydra.run.dir=" in lines[0]
        assert hashes(run_dir) == before
    finally:
        first.kill()  # SIGKILL: no chance to unlock; the kernel drops the lock
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert train_in_process(run_dir, *overrides) == 0  # takes the lock and resumes
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_the_lock_goes_with_the_run_and_a_no_op_changes_nothing(tmp_path, one_thread):
    """The lock is held by the train() call, not the process: the same process runs again."""
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, *RUN, "trainer.max_steps=2") == 0
    before = hashes(run_dir)
    assert train_in_process(run_dir, *RUN, "trainer.max_steps=2") == 0  # already finished
    assert hashes(run_dir) == before  # the lock, like everything else, is as it was


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from graft.train.run_lock import hold_run_dir
with hold_run_dir(Path(sys.argv[1])):
    worker = os.fork()  # as a DataLoader forks its workers
    if worker == 0:
        time.sleep(120)
        os._exit(0)
    print(worker, flush=True)
    time.sleep(120)
"""


@pytest.mark.distributed
def test_a_forked_worker_does_not_keep_a_killed_holders_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"in use by another job \\(pid {holder.pid} on "):
            run_lock.lock(run_dir)
        holder.kill()
        holder.wait(timeout=30)
        assert alive(worker)
        with run_lock.hold_run_dir(run_dir):  # the worker lives on, the lock is free
            assert run_lock.holder(run_dir / ".lock").startswith(f"pid {os.getpid()} on ")
    finally:
        holder.kill()
        os.kill(worker, signal.SIGKILL)


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(UserError, match="run is a file, not a run directory; move it away"):
        run_lock.lock(tmp_path / "run")
    with pytest.raises(UserError, match="cannot hold a run \\(Not a directory"):
        run_lock.lock(tmp_path / "run" / "inner")
    assert (tmp_path / "run").read_text() == "notes"


# Preemption and time limits.


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_checkpoints_at_the_next_step_and_the_rerun_ends_bit_for_bit(
    tmp_path, uninterrupted, one_thread, signum
):
    run_dir = tmp_path / "run"
    job = slow_cli(run_dir, *RUN)
    wait_for(lambda: steps_logged(run_dir), "the first logged step", job)
    job.send_signal(signum)
    assert job.wait(timeout=60) == 128 + signum, output(run_dir)
    (stopped_at,) = checkpoint_steps(run_dir)
    assert 1 <= stopped_at < 30
    assert f"{signum.name}: stopped at step {stopped_at} with its checkpoint" in output(run_dir)
    assert steps_logged(run_dir) == list(range(1, stopped_at + 1))  # every line, none torn
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.safetensors").exists()

    assert train_in_process(run_dir, *RUN) == 0
    reference = (uninterrupted / "model.safetensors").read_bytes()
    assert (run_dir / "model.safetensors").read_bytes() == reference
    assert without_timing(read_metrics(run_dir / "metrics.jsonl")) == without_timing(
        read_metrics(uninterrupted / "metrics.jsonl")
    )


class RecordingLauncher:
    """What hydra-submitit-launcher's launcher is to submitit: a callable with `checkpoint`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.checkpoints_at_requeue: list[int] = []

    def __call__(self) -> None:
        pass

    def checkpoint(self, *args, **kwargs):
        import submitit

        self.checkpoints_at_requeue = checkpoint_steps(self.run_dir)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@pytest.mark.distributed
def test_under_submitit_the_checkpoint_is_written_before_submitit_requeues(
    tmp_path, monkeypatch, one_thread, environment
):
    """submitit's own SIGUSR2 handler (as its job process installs it) still requeues: it is
    called once the checkpoint of the stopping step is written."""
    from submitit.core import job_environment, utils
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    job_folder = tmp_path / "submitit"
    job_folder.mkdir()
    for name, value in {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_FOLDER": str(job_folder),
        "SUBMITIT_LOCAL_JOB_ID": "7",
        "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_LOCALID": "0",
        "MASTER_PORT": "29999",  # preset, as a cluster profile may have it
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    launcher = RecordingLauncher(run_dir)
    delayed = utils.DelayedSubmission(launcher)
    delayed.set_timeout(60, 3)
    environment = job_environment.JobEnvironment()
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    environment._handle_signals(environment.paths, delayed)  # what submitit's job process does
    try:
        # The signal arrives during step 3, as the time limit's SIGUSR2 would.
        from graft.train import loop

        step = loop.train_step

        def train_step(run):
            if run.progress.step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
            return step(run)

        monkeypatch.setattr(loop, "train_step", train_step)
        with pytest.raises(SystemExit) as exit_:
            train_in_process(run_dir, *RUN)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert exit_.value.code == LOCAL_REQUEUE_RETURN_CODE  # submitit requeued the job
    assert launcher.checkpoints_at_requeue == [3]  # and the checkpoint came first
    assert environment.paths.submitted_pickle.exists()  # submitit's requeue state
    assert signal.getsignal(signal.SIGUSR2) == previous[signal.SIGUSR2]
    monkeypatch.undo()
    assert train_in_process(run_dir, *RUN) == 0  # the requeued job resumes and finishes


# Environment.


def slurm_job(monkeypatch, *, rank: int, nodes: int = 1, tasks: int = 2, **preset: str) -> None:
    """A faked Slurm task as submitit's job process sees it (what TorchDistributedEnvironment
    reads): SUBMITIT_EXECUTOR and the SLURM_* variables."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    per_node = tasks // nodes
    variables = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(tasks),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODEID": str(rank // per_node),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % per_node),
        "SLURM_JOB_NODELIST": "gpu[3-4]" if nodes == 2 else "gpu3",
        **preset,
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("preset", "expected_addr", "expected_port"),
    [
        ({}, "gpu3", None),  # submitit's choices: the first host, a port from the job id
        ({"MASTER_PORT": "29500"}, "gpu3", "29500"),
        ({"MASTER_ADDR": "10.0.0.7"}, "10.0.0.7", None),
        ({"MASTER_ADDR": "gpu3.cluster", "MASTER_PORT": "1234"}, "gpu3.cluster", "1234"),
    ],
)
def test_a_submitit_job_keeps_a_preset_master_address_and_port(
    monkeypatch, environment, preset, expected_addr, expected_port
):
    slurm_job(monkeypatch, rank=3, nodes=2, tasks=4, **preset)
    distributed.from_submitit()
    assert os.environ["MASTER_ADDR"] == expected_addr
    if expected_port is not None:
        assert os.environ["MASTER_PORT"] == expected_port
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000 or expected_port is not None
    ranks = {name: os.environ[name] for name in distributed.RANK_VARIABLES}
    assert ranks == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.writes_files() is False


def test_submitits_own_export_refuses_a_preset_port(monkeypatch, environment):
    """Why graft exports the variables itself: submitit's export raises."""
    import submitit.helpers

    slurm_job(monkeypatch, rank=0, MASTER_PORT="29500")
    with pytest.raises(RuntimeError, match="MASTER_PORT is already set"):
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def test_a_loopback_master_address_gives_way_to_the_first_host_across_nodes(
    monkeypatch, environment
):
    slurm_job(monkeypatch, rank=0, nodes=2, tasks=4, MASTER_ADDR="localhost")
    distributed.from_submitit()
    assert os.environ["MASTER_ADDR"] == "gpu3"
    slurm_job(monkeypatch, rank=0, nodes=1, tasks=2, MASTER_ADDR="localhost")
    distributed.from_submitit()
    assert os.environ["MASTER_ADDR"] == "localhost"  # one node: loopback reaches every rank


def launcher_config(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.parametrize(
    ("overrides", "tasks"),
    [
        ([], 8),
        (["hydra.launcher.gpus_per_node=4"], 4),
        (["hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=2"], 2),
        (["hydra.launcher.tasks_per_node=3"], 3),
    ],
)
def test_tasks_per_node_follows_gpus_per_node_unless_set(overrides, tasks):
    from hydra.utils import instantiate

    launcher = launcher_config(*overrides)
    assert launcher.tasks_per_node == tasks
    # As the launcher hands it to submitit: resolved.
    assert instantiate(launcher).params["tasks_per_node"] == tasks


@pytest.mark.parametrize(
    ("local_rank", "visible", "index"), [(0, 8, 0), (3, 8, 3), (3, 1, 0), (1, 1, 0), (5, 4, 0)]
)
def test_each_rank_takes_its_own_gpu_or_the_one_it_sees(monkeypatch, local_rank, visible, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.rank_device(local_rank) == torch.device("cuda", index)


def test_setup_puts_a_rank_bound_to_one_gpu_on_cuda_0(monkeypatch, environment):
    """Per-task GPU binding: rank 1 of 2 sees one GPU, its own, as cuda:0."""
    joined: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.update(set=device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kw: joined.update(kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: "control")
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setattr(distributed, "_control", None)  # setup() sets it; undone after the test
    ranks, device = distributed.setup("auto", "auto", 60)
    assert (ranks.rank, ranks.local_rank) == (1, 1)
    assert device == torch.device("cuda", 0) == joined["set"] == joined["device_id"]


# Data preparation once.


def join_two_ranks(rank: int, folder: Path) -> None:
    """This spawned process as rank `rank` of 2 (gloo, a file rendezvous), whose collectives
    time out after 5 s."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=5),
    )


def slow_to_prepare_rank(rank: int, folder: Path) -> None:
    """A rank of a 2-rank job whose collectives time out after 5 s; rank 0's data takes 8 s."""
    join_two_ranks(rank, folder)
    from graft.train import setup

    build = setup.build_task

    def slow_build(*args, **kwargs):
        if rank == 0:
            time.sleep(8)  # past trainer.timeout_s: the others must not time out waiting
        return build(*args, **kwargs)

    setup.build_task = slow_build
    cfg = config(*RUN, "trainer.max_steps=4", "trainer.timeout_s=5", "trainer.batch_size=8")
    code = train(cfg, folder / "run")
    (folder / f"rank{rank}.json").write_text(json.dumps({"code": code}))


@pytest.mark.slow
def test_the_first_rank_prepares_the_data_while_the_others_wait_past_the_timeout(tmp_path):
    mp.spawn(slow_to_prepare_rank, args=(tmp_path,), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"code": 0}
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == 4


def rank_signalled_alone(rank: int, folder: Path) -> None:
    """Rank 1 alone gets SIGUSR2, during step 3; rank 0 hears of it through the vote."""
    join_two_ranks(rank, folder)
    from graft.train import loop

    step = loop.train_step

    def train_step(run):
        if rank == 1 and run.progress.step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return step(run)

    loop.train_step = train_step
    cfg = config(*RUN, "trainer.timeout_s=5", "trainer.batch_size=8")
    try:
        outcome = {"code": train(cfg, folder / "run")}
    except preemption.StopRequested as stop:
        outcome = {"signum": stop.signum, "step": stop.step, "code": stop.code}
    (folder / f"rank{rank}.json").write_text(json.dumps(outcome))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    mp.spawn(rank_signalled_alone, args=(tmp_path,), nprocs=2)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0]["signum"] == signal.SIGUSR2 and outcomes[0]["code"] == 140
    assert checkpoint_steps(tmp_path / "run") == [outcomes[0]["step"]]
    assert 3 <= outcomes[0]["step"] < 30


# The launcher dies, the workers stop.


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its new parent, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_killing_torchrun_stops_its_workers_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "graft.train", *TINY, *RUN, "trainer.max_steps=100000"]
    command += ["trainer.batch_size=8", "trainer.eval_every=0", f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "torchrun.out", "w") as log:
        torchrun = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=log)
    workers: list[int] = []
    try:
        wait_for(lambda: steps_logged(run_dir), "the first logged step", torchrun)
        found = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True)
        workers = [int(pid) for pid in found.stdout.split()]
        assert len(workers) == 2
        torchrun.kill()
        torchrun.wait(timeout=30)
        wait_for(lambda: not any(map(alive, workers)), "the workers to stop", timeout_s=20)
    finally:
        torchrun.kill()
        for pid in filter(alive, workers):
            os.kill(pid, signal.SIGKILL)
    (stopped_at,) = checkpoint_steps(run_dir)  # they stopped as on SIGTERM: with a checkpoint
    assert steps_logged(run_dir)[-1] == stopped_at
    assert "the launcher (torchrun" in (tmp_path / "torchrun.out").read_text()


@pytest.mark.slow
def test_stop_signals_are_handed_back_after_a_run(tmp_path, one_thread):
    before = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    assert train_in_process(tmp_path / "run", *RUN, "trainer.max_steps=2") == 0
    assert {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS} == before
