"""W&B on a compute node: no network decided in seconds, and a killed run's rows not lost.

The W&B runs here are real (offline); what they recorded is read back from their `.wandb`
transaction logs, the files `wandb sync` uploads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft.common import network
from graft.common.errors import UserError
from graft.train.metrics import read_metrics, wandb_mode
from graft.train.wandb_history import history_rows, read_records, run_logs
from tests.runs import worker_pids

REPO = Path(__file__).resolve().parents[1]
AUTO = {"name": "wandb", "mode": "auto"}


def closed_port() -> int:
    """A localhost port nothing listens on: connecting is refused at once."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        return server.getsockname()[1]


@pytest.fixture
def compute_node(monkeypatch, tmp_path):
    """Credentials set, and the W&B host unreachable (a closed port), no proxy."""
    for key in [key for key in os.environ if key.startswith("WANDB_") or "proxy" in key.lower()]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HOME", str(tmp_path))
    network.probe.cache_clear()
    yield
    network.probe.cache_clear()


def test_the_probe_tells_a_listening_host_from_a_closed_port_and_an_unknown_name():
    network.probe.cache_clear()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert network.unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    port = closed_port()
    assert network.unreachable(f"http://127.0.0.1:{port}") == (
        f"127.0.0.1:{port}: connection refused"
    )
    assert network.unreachable("https://no-such-host.invalid") == (
        "no-such-host.invalid:443: name not resolved"
    )


@pytest.mark.slow
def test_a_host_that_never_answers_is_given_up_on_after_the_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(1)  # outlives the probe's wait, then fails as a dead route would
        raise OSError("unreachable")

    network.probe.cache_clear()
    monkeypatch.setattr(network.socket, "create_connection", hang)
    assert network.unreachable("https://api.wandb.ai", timeout=0.2) == (
        "api.wandb.ai:443: no answer within 0.2 s"
    )
    network.probe.cache_clear()


def test_traffic_through_a_proxy_probes_the_proxy(monkeypatch):
    for key in [key for key in os.environ if "proxy" in key.lower()]:
        monkeypatch.delenv(key)
    assert network.endpoint("https://api.wandb.ai") == ("api.wandb.ai", 443)
    assert network.endpoint("http://localhost:8080") == ("localhost", 8080)
    monkeypatch.setenv("https_proxy", "http://proxy.cluster:3128")
    assert network.endpoint("https://api.wandb.ai") == ("proxy.cluster", 3128)
    monkeypatch.setenv("no_proxy", "api.wandb.ai")
    assert network.endpoint("https://api.wandb.ai") == ("api.wandb.ai", 443)


def test_auto_with_credentials_and_no_network_falls_back_to_offline(compute_node):
    mode, why = wandb_mode(AUTO)
    assert mode == "offline"
    assert why.startswith("credentials found, but W&B is unreachable: 127.0.0.1:")
    assert "connection refused" in why and "WANDB_MODE=offline" in why
    # Reachable: online, as before.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert wandb_mode(AUTO) == ("online", "credentials found")
        assert wandb_mode({**AUTO, "mode": "online"}) == ("online", "logger.mode=online")


@pytest.mark.parametrize("where", ["logger.mode", "WANDB_MODE"])
def test_an_explicit_online_without_network_is_refused_in_one_line(
    compute_node, monkeypatch, where
):
    logger = {**AUTO, "mode": "online"} if where == "logger.mode" else AUTO
    if where == "WANDB_MODE":
        monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError) as error:
        wandb_mode(logger)
    message = str(error.value)
    assert message.startswith(f"{where}=online but W&B is unreachable (127.0.0.1:")
    assert "WANDB_MODE=offline" in message and "wandb sync" in message and "\n" not in message


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without W&B settings or proxies, W&B's own folders in tmp_path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WANDB_") and "proxy" not in key.lower()
    }
    wandb_home = tmp_path / "wandb_home"
    env.update(
        PYTHONPATH=str(REPO),
        WANDB_DIR=str(wandb_home),
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"),
        WANDB_DATA_DIR=str(wandb_home / "data"),
        **extra,
    )
    return env


@pytest.mark.slow
def test_cli_with_logger_mode_online_and_no_network_exits_2_at_once(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(
        tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}"
    )
    command = [sys.executable, "-m", "graft.train", "logger=wandb", "logger.mode=online"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft-train: error: logger.mode=online but")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "wandb").exists()


ROWS = 2000  # over 32 KiB of transaction log: records span blocks


@pytest.fixture(scope="module")
def offline_run(module_tmp) -> tuple[Path, subprocess.CompletedProcess]:
    """The compute-node default, for real: credentials set, W&B unreachable, mode auto."""
    tmp_path = module_tmp
    script = f"""
import logging, pathlib
logging.basicConfig(level=logging.INFO)
from graft.train.metrics import MetricsLog
log = MetricsLog(pathlib.Path({str(tmp_path)!r}), resume_step=0, logger={{"name": "wandb",
    "mode": "auto", "project": "graft-test", "entity": None, "group": None, "tags": []}},
    config={{}}, run_name="adam#sgd seed0", wandb_id=None)
for step in range(1, {ROWS} + 1):
    log.log(step, {{"train/loss": 1.0 / step, "eval/accuracy": step % 7}})
log.close()
print("ID", log.wandb_id)
"""
    env = clean_env(
        tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return tmp_path, result


@pytest.mark.slow
def test_a_run_with_credentials_and_no_network_logs_offline_and_says_so(offline_run):
    """W&B offline in run_dir/wandb, said in one warning line, and every row recorded."""
    run_dir, result = offline_run
    [line] = [line for line in result.stderr.splitlines() if "W&B is unreachable" in line]
    assert line.startswith("WARNING:graft.train.metrics:W&B: offline (credentials found, but")
    assert "WANDB_MODE=offline" in line and f"wandb sync {run_dir}/wandb" in line
    run_id = result.stdout.split("ID ")[1].strip()
    [log_file] = run_logs(run_dir / "wandb", run_id)
    rows = {
        step: {"train/loss": 1.0 / step, "eval/accuracy": step % 7} for step in range(1, ROWS + 1)
    }
    assert history_rows(log_file) == rows


@pytest.mark.slow
def test_a_torn_transaction_log_reads_up_to_the_tear(offline_run, tmp_path):
    """A kill leaves the .wandb file cut anywhere: reading stops before the torn record."""
    [original] = (offline_run[0] / "wandb").glob("offline-run-*/run-*.wandb")
    whole = original.read_bytes()
    assert len(whole) > 3 * 32768
    log_file = tmp_path / original.name
    log_file.write_bytes(whole)
    records = len(list(read_records(log_file)))
    for cut in (len(whole) // 2, 32768 + 3, len(whole) - 5):
        log_file.write_bytes(whole[:cut])
        assert 0 < len(list(read_records(log_file))) < records
        torn = history_rows(log_file)
        assert sorted(torn) == list(range(1, len(torn) + 1))  # a prefix of the rows
    log_file.write_bytes(whole[:1000] + b"\xff" + whole[1001:])  # a flipped byte: stops there
    assert len(list(read_records(log_file))) < records


def kill_after_checkpoint(command: list[str], env: dict, checkpoint: Path) -> None:
    """Start `command`, SIGKILL it as soon as `checkpoint` exists (W&B still holds rows);
    under torchrun, its last rank (torchrun then ends the job)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {checkpoint.name}: {process.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)
    ranks = worker_pids(process.pid) if "torch.distributed.run" in command else []
    os.kill(ranks[-1] if ranks else process.pid, signal.SIGKILL)
    process.wait()


# One process, and FSDP over 2 ranks (rank 0 logs, as under DDP).
LAUNCHERS = {
    "one process": [sys.executable, "-m", "graft.train"],
    "fsdp, 2 ranks": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "graft.train",
        "trainer.parallel=fsdp",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_after_a_kill_and_a_resume_wandb_holds_every_row_of_metrics_jsonl(tmp_path, launcher):
    run_dir = tmp_path / "run"
    command = [
        *LAUNCHERS[launcher],
        "logger=wandb",
        "logger.mode=offline",
        "trainer.batch_size=16",
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=4",
        "trainer.log_norms_every=0",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = clean_env(tmp_path)
    kill_after_checkpoint(command, env, run_dir / "checkpoints" / "step_00000004.pt")
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} from step 4" in resumed.stdout + resumed.stderr

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert {key for row in rows for key in row} >= {"train/loss", "eval/loss", "eval/top1"}
    [run_id] = {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}
    segments = run_logs(run_dir / "wandb", run_id)
    assert len(segments) == 2
    history: dict[int, dict] = {}
    for segment in segments:  # what the segments hold together
        for step, row in history_rows(segment).items():
            history.setdefault(step, {}).update(row)
    expected = {row["step"]: {k: v for k, v in row.items() if k != "step"} for row in rows}
    assert history == expected
