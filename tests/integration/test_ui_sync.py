"""Against a real `mlflow server` on loopback: run names, params vs tags, `run.py ui`, and `run.py sync` after a lost server."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, last_logged_step, run_cli
from research.runner import run_tracked
from research.names import COMPILE_RESOLVED, EXPERIMENT_KIND, NOTE
from research.tracking_store import recipe_description
from research.ui import start_server, stop_server, wait_until_healthy
from test_sweep import empty_store  # noqa: F401 (a fixture: a migrated MLflow store to copy)

CORPUS = REPO / "tests" / "data" / "tang_song.jsonl"  # tokenized in a blink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a SQLite file, in its own process group; start() again after stop() serves the same store on the same port."""

    def __init__(self, folder: Path):
        self.db, self.art, self.log = folder / "server.db", folder / "server-artifacts", folder / "server.log"
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.proc = None

    def start(self) -> None:
        port = self.uri.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.art),
               "--host", "127.0.0.1", "--port", port, "--workers", "1"]
        with open(self.log, "a") as log:
            self.proc = start_server(cmd, log)
        try:
            wait_until_healthy(self.uri, self.proc)
        except Exception:
            pytest.fail("mlflow server did not start: " + self.log.read_text()[-2000:])

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server(tmp_path, empty_store):  # noqa: F811
    shutil.copy(empty_store, tmp_path / "server.db")
    running = Server(tmp_path)
    running.start()
    yield running
    stop_server(running.proc)


def test_runs_are_named_and_log_only_portable_params(tiny_cfg, server):
    cfg = tiny_cfg(tracking__uri=server.uri, train__max_steps=2, train__warmup_steps=0, train__eval_every=0, train__sample_tokens=0,
                   tracking__log_hf_model=False, data__path=str(CORPUS))
    first, second = run_tracked(cfg), run_tracked(cfg)
    client = MlflowClient(server.uri)
    run = client.get_run(first.run_id)
    assert run.info.run_name == "baseline" and client.get_run(second.run_id).info.run_name == "baseline-2"
    params = run.data.params
    assert not [k for k, v in params.items() if v.startswith("/")]
    assert not [k for k in params if k.startswith(("bench.", "sweep.", "tracking.")) or k == "out_dir"]
    assert {"exp", "seed", "train.lr", "data.seq_len"} <= params.keys() and params["data.path"] == "tests/data/tang_song.jsonl"
    tags = run.data.tags
    assert tags["train.checkpoint_dir"].startswith("/") and tags["data.cache_dir"] and tags["out_dir"]
    assert tags["git.dirty"] in ("true", "false") and "train.checkpoint_dir" not in params
    assert params["train.compile"] == "auto" and params[COMPILE_RESOLVED] == "false"  # what auto chose: no compiling for a tiny model on a CPU
    assert first.run_page == f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{first.run_id}?workflowType=machine_learning"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[NOTE] == recipe_description("baseline") and experiment.tags[EXPERIMENT_KIND] == "custom_model_development"

    proc = run_cli("ui", f"tracking.uri={server.uri}", timeout=120)  # a server store: print where to look, start nothing
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{server.uri}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning" in proc.stdout


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by parent links in /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ui_on_sqlite_answers_and_sigterm_stops_everything_it_started(tmp_path, empty_store):  # noqa: F811
    (tmp_path / "results").mkdir()
    shutil.copy(empty_store, tmp_path / "results" / "mlflow.db")
    port = free_port()
    ui = subprocess.Popen([sys.executable, str(REPO / "run.py"), "ui", f"out_dir={tmp_path / 'results'}", f"port={port}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", ui, timeout_s=180)
        assert b"<html" in urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().lower()
        started = descendants(ui.pid)
        assert started  # mlflow server and its workers
        ui.send_signal(signal.SIGTERM)
        stdout, stderr = ui.communicate(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == 0 and "Traceback" not in stderr, stderr
    assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in stdout  # no baseline experiment yet: the list
    deadline = time.monotonic() + 15
    while [pid for pid in started if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)]


def test_a_run_that_lost_its_server_is_synced_into_the_same_run_once(tmp_path, token_cache, server):
    steps, out = 80, tmp_path / "results"
    args = [f"{k}={v}" for k, v in TINY.items()] + [
        f"data.cache_dir={token_cache}", f"data.path={CORPUS}", f"train.max_steps={steps}", "train.log_every=2", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=10", "train.threads=1", "tracking.log_hf_model=false", f"tracking.uri={server.uri}", f"out_dir={out}"]
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    trainer = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    deadline = time.monotonic() + 120
    while last_logged_step(server.db) < 10 and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    stdout, stderr = trainer.communicate(timeout=180)
    assert trainer.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "View run" not in stdout and f"{server.uri}/#/experiments/" in stdout  # our link to the classic run page, not MLflow's to the GenAI view
    assert all(line.endswith("?workflowType=machine_learning") for line in stdout.splitlines() if "/#/experiments/" in line), stdout
    assert 10 <= last_logged_step(server.db) < steps  # the server was lost mid-run
    (fallback,) = (out / "offline").glob("*.jsonl")
    run_id = fallback.stem
    assert (out / "offline" / run_id / "model" / "model.safetensors").exists() and "python run.py sync" in stderr

    server.start()
    started = time.monotonic()
    first = run_cli("sync", f"tracking.uri={server.uri}", f"out_dir={out}", timeout=180)
    print(f"sync took {time.monotonic() - started:.1f} s (with the interpreter start)")
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert f"run {run_id} -> same run {run_id}" in first.stdout and "status FINISHED" in first.stdout, first.stdout
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert loss_steps == list(range(1, steps + 1))
    assert client.get_metric_history(run_id, "final/val_loss")[0].step == steps
    assert {"model", "samples.md", "loss_curve.png", "tokenizer", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}
    counts = {key: len(client.get_metric_history(run_id, key)) for key in run.data.metrics}

    second = run_cli("sync", f"tracking.uri={server.uri}", f"out_dir={out}", timeout=180)
    assert second.returncode == 0 and "nothing left to sync" in second.stdout, second.stdout + second.stderr
    assert {key: len(client.get_metric_history(run_id, key)) for key in run.data.metrics} == counts
    assert client.get_run(run_id).info.status == "FINISHED" and (out / "offline" / "synced" / fallback.name).exists()
