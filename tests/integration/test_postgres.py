"""Sweeps on a real PostgreSQL server: workers started together on an empty database, a worker killed, bad URLs.

Every test gets fresh databases on the session's throwaway server (the `postgres` fixture); the workers are
real `run.py` processes.
"""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import PG_PASSWORD, REPO, TINY, assert_one_line_error, free_port, run_cli
from research.errors import UserError
from research.sweep import CHILD_RUN_ATTR
from research.tracking_store import connect

STUDY = "lr_sweep-sweep"
SWEEP = {**TINY, "train.max_steps": 8, "train.eval_every": 4, "train.eval_batches": 1, "train.sample_tokens": 0, "sweep.confirm_seeds": 0, "sweep.eval_seeds": 0,
         "data.path": str(REPO / "tests" / "data" / "tang_song.jsonl"), "exp": "lr_sweep"}


def worker_args(storage: str, tracking: str, out_dir, token_cache, **overrides) -> list[str]:
    settings = {**SWEEP, "sweep.storage": storage, "tracking.uri": tracking, "out_dir": str(out_dir), "data.cache_dir": token_cache, **overrides}
    return [f"{k}={v}" for k, v in settings.items()]


def start_worker(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sweep_runs(tracking: str) -> tuple[list, list]:
    """(parent runs, child runs) of the lr_sweep experiment."""
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("lr_sweep").experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if r not in children], children


def test_three_workers_started_together_on_an_empty_database_share_one_study(postgres, tmp_path, token_cache):
    storage, tracking = postgres("optuna"), postgres("mlflow")
    args = worker_args(storage, tracking, tmp_path / "results", token_cache, **{"sweep.n_trials": 6})
    workers = [start_worker(args, tmp_path) for _ in range(3)]  # at the same moment, on databases without a table
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out[-2000:] + err[-3000:]

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    parents, children = sweep_runs(tracking)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(int(c.data.tags["sweep.trial_number"]) for c in children) == list(range(6))
    assert {t.user_attrs[CHILD_RUN_ATTR] for t in trials} == {c.info.run_id for c in children}
    for child in children:
        assert child.info.status == "FINISHED" and "val/loss" in child.data.metrics
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.params["tokens_per_step"] == str(TINY["train.batch_size"] * TINY["data.seq_len"]) and child.data.tags["world_size"] == "1"


def test_a_killed_worker_s_trial_is_failed_and_run_again_by_the_other(postgres, tmp_path, token_cache):
    storage, tracking = postgres("optuna"), postgres("mlflow")
    common = {"sweep.n_trials": 3, "sweep.heartbeat_s": 1, "sweep.grace_s": 4, "train.max_steps": 40, "train.eval_every": 20}
    victim = start_worker(worker_args(storage, tracking, tmp_path / "victim", token_cache, **common), tmp_path)
    client = connect(tracking)
    deadline = time.monotonic() + 240
    while (running := victim_runs(client, tmp_path / "victim")) == [] and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running, "the first worker never started a trial: " + (victim.stderr.read()[-3000:] if victim.poll() is not None else "")
    survivor = start_worker(worker_args(storage, tracking, tmp_path / "survivor", token_cache, **common), tmp_path)
    os.kill(victim.pid, signal.SIGKILL)  # mid-trial: its run is RUNNING and training
    victim.communicate()
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, out[-2000:] + err[-3000:]

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(finished) == 3 and len(failed) == 1 and len(trials) == 4
    assert failed[0].user_attrs[CHILD_RUN_ATTR] == running[0].info.run_id
    killed = client.get_run(running[0].info.run_id)
    assert killed.info.status == "FAILED" and "no heartbeat" in killed.data.tags["end_reason"]
    parents, children = sweep_runs(tracking)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]


def victim_runs(client: MlflowClient, out_dir) -> list:
    """The RUNNING child runs a worker with this out_dir is training (its `out_dir` tag says which worker)."""
    experiment = client.get_experiment_by_name("lr_sweep")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return [r for r in runs if r.data.tags.get("out_dir") == str(out_dir) and "mlflow.parentRunId" in r.data.tags]


def test_bad_credentials_unreachable_servers_and_missing_drivers_are_one_line(postgres, tmp_path, token_cache):
    good = postgres("optuna")
    wrong = good.replace(PG_PASSWORD, "not-the-password")
    proc = run_cli(*worker_args(wrong, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results", token_cache, **{"sweep.n_trials": 1}))
    assert_one_line_error(proc, "cannot open Optuna storage postgresql://lab:***@127.0.0.1", "password authentication failed")
    assert "not-the-password" not in proc.stderr + proc.stdout

    unreachable = good.replace(f":{postgres.port}/", f":{free_port()}/")
    missing_driver = good.replace("postgresql://", "postgresql+pg8000://")
    for url, reason in [(wrong, "password authentication failed"), (unreachable, "connection"), (missing_driver, "pg8000")]:
        with pytest.raises(UserError, match="cannot open the MLflow tracking store postgresql.*://lab:\\*\\*\\*@") as caught:
            connect(url)
        assert reason in str(caught.value) and "not-the-password" not in str(caught.value)



OPEN_BOTH_AT = """
import sys
from omegaconf import OmegaConf
from research.sweep import open_storage
from research.tracking_store import connect
storage, tracking = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()  # every process is past its imports: go, all at once
open_storage(storage, OmegaConf.create({"heartbeat_s": 30, "grace_s": 300}), None)
connect(tracking)
"""


def test_processes_creating_the_tables_at_the_same_instant_all_succeed(postgres):
    storage, tracking = postgres("optuna"), postgres("mlflow")
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_BOTH_AT, storage, tracking], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
