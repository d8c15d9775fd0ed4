"""Bad input, faults and concurrency, end to end: one line on stderr, a clear exit status, no run left RUNNING.

Reader messages are checked in test_data.py, config errors in test_cli.py, a dead worker's planted trial in
test_sweep.py; here each fault goes through `run.py` (where exit status and stderr matter) or `run_tracked`,
and the MLflow store is checked afterwards.
"""

import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, TINY, last_logged_step, run_cli
from research import registry
from research.checkpoint import load_checkpoint
from research.errors import UserError
from research.runner import run_tracked
from research.sweep import CHILD_RUN_ATTR, run_sweep
from research.metrics import NonFiniteLoss
from research.step import SkippedSteps, optimizer_step
from research.trainer import out_of_memory_advice
from research.tracking_store import tracking_uri
from conftest import assert_one_line_error
from test_sweep import empty_store  # noqa: F401 (a fixture: a migrated MLflow store to copy)

CORPUS = REPO / "tests" / "data" / "tang_song.jsonl"  # 100k tokens: tokenized in a blink
FAST = {"train.sample_tokens": 0, "tracking.log_hf_model": False, "data.path": str(CORPUS)}


@pytest.fixture
def store(tmp_path, empty_store):  # noqa: F811
    """tmp_path/results starts with an empty MLflow store (what tiny_cfg points at)."""
    (tmp_path / "results").mkdir()
    shutil.copy(empty_store, tmp_path / "results" / "mlflow.db")
    return tmp_path / "results"


def all_runs(cfg) -> list:
    client = MlflowClient(tracking_uri(cfg))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000) if experiments else []


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def corpus_lines(n: int = 400) -> list[bytes]:
    return CORPUS.read_bytes().splitlines()[:n]


# ---- bad data and tokenizers: the run was opened, so it must end FAILED with the reason ----


def test_bad_data_and_tokenizers_fail_the_run_with_the_reason(tiny_cfg, tmp_path, store):
    good = corpus_lines()
    words = [json.dumps({"text": f"w{i} w{i}"}).encode() for i in range(300)]  # short docs: the 1% validation split is tiny
    gz = gzip.compress(b"\n".join(good))
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    cases = [
        ({"data.path": str(tmp_path / "missing.jsonl")}, ["data file not found", "missing.jsonl"]),
        ({"data.path": str(write_lines(tmp_path / "empty.jsonl", []))}, ["has no documents"]),
        ({"data.path": str(write_lines(tmp_path / "bad.jsonl", [good[0], b'{"text": "cut', *good[1:]]))},
         ["line 2 of", "bad.jsonl", "not valid JSON", "data.skip_bad_lines=true"]),
        ({"data.path": str(write_lines(tmp_path / "nokey.jsonl", [*good[:3], b'{"body": "x"}']))}, ["line 4 of", "no 'text' key", "data.text_key"]),
        ({"data.path": str(write_lines(tmp_path / "latin1.jsonl", [good[0], '{"text": "café"}'.encode("latin-1")]))}, ["line 2 of", "not valid UTF-8"]),
        ({"data.path": str(tmp_path / "cut.jsonl.gz")}, ["cut.jsonl.gz", "truncated or corrupt gzip"]),
        ({"data.path": str(CORPUS), "train.batch_size": 100_000}, ["one step needs train.batch_size", "lower train.batch_size"]),
        ({"data.path": str(write_lines(tmp_path / "short.jsonl", words)), "data.val_fraction": 0.01}, ["validation split has", "raise data.val_fraction"]),
        ({"data.tokenizer": str(tmp_path / "no-tokenizer")}, ["tokenizer folder not found", "no-tokenizer"]),
        ({"model.vocab_size": 300}, ["model.vocab_size=300", "set model.vocab_size>="]),
    ]
    messages = []
    for overrides, fragments in cases:
        cfg = tiny_cfg(**{k.replace(".", "__"): v for k, v in overrides.items()})
        with pytest.raises(UserError) as err:
            run_tracked(cfg)
        message = str(err.value)
        assert "\n" not in message and " at at " not in message, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
        messages.append(message)
    runs = all_runs(cfg)
    assert len(runs) == len(cases)
    assert all(run.info.status == "FAILED" for run in runs)
    assert sorted(run.data.tags["end_reason"] for run in runs) == sorted(f"UserError: {m}" for m in messages)


def test_skipped_lines_are_counted_on_the_run(tiny_cfg, tmp_path, store):
    good = corpus_lines()
    path = write_lines(tmp_path / "mixed.jsonl", [*good[:200], b"{oops", *good[200:], b'{"body": 1}', b"\xff\xfe"])
    cfg = tiny_cfg(data__path=str(path), data__skip_bad_lines=True, train__max_steps=2, train__warmup_steps=0, train__eval_every=0, train__eval_batches=1,
                   train__sample_tokens=0, tracking__log_hf_model=False)
    result = run_tracked(cfg)
    run = MlflowClient(tracking_uri(cfg)).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["data.skipped_lines"] == "3"


def test_an_uncreatable_checkpoint_folder_fails_before_training(tiny_cfg, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")  # we run as root: a path through a file is what stays unwritable
    cfg = tiny_cfg(tracking__enabled=False, train__checkpoint_dir=str(tmp_path / "afile" / "checkpoints"))
    with pytest.raises(UserError, match=r"cannot create the checkpoint folder .*afile/checkpoints \(Not a directory\); set out_dir"):
        run_tracked(cfg)


# ---- training faults ----


def test_a_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tiny_cfg, store):
    """lr=1e4 breaks an fp32 run within a few steps; with log_every=50 and checkpoints every 3 steps, only a per-step check stops it at once."""
    cfg = tiny_cfg(train__lr=1e4, train__warmup_steps=0, train__grad_clip=0.0, train__max_steps=40, train__log_every=50,
                   train__eval_every=0, train__checkpoint_every=3, train__keep_checkpoints=1, **{k.replace(".", "__"): v for k, v in FAST.items()})
    with pytest.raises(NonFiniteLoss) as err:
        run_tracked(cfg)
    step = err.value.step
    message = str(err.value)
    assert f"at step {step};" in message and "lower train.lr" in message and "precision" not in message  # fp32 already
    (run,) = all_runs(cfg)
    assert run.info.status == "FAILED" and f"at step {step};" in run.data.tags["end_reason"]
    client = MlflowClient(tracking_uri(cfg))
    curves = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in ("train/loss", "train/grad_norm")}
    assert max(curves["train/loss"]) == step < cfg.train.max_steps  # not one step trained past the bad one
    finite = {s: all(math.isfinite(curve[s]) for curve in curves.values()) for s in curves["train/loss"]}
    assert not finite[step] and all(finite[s] for s in finite if s < step)
    kept = run.data.tags["checkpoint.latest"]
    assert kept.endswith(f"step_{(step - 1) // 3 * 3:08d}.pt"), kept  # the newest checkpoint before the bad step
    assert f"last good checkpoint: {kept}" in message
    weights = load_checkpoint(kept)["state"]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fp16_overflow_steps_are_counted_and_too_many_in_a_row_stop_the_run():
    """A real GradScaler (CPU: same overflow logic as CUDA) skips steps whose scaled gradients overflow."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = SkippedSteps(limit=3)
    x = torch.ones(2, 4)

    def step(overflow: bool, number: int) -> bool:
        before = layer.weight.detach().clone()
        scaler.scale(layer(x).sum() * (1e36 if overflow else 1.0)).backward()  # * 65536 overflows fp32
        optimizer_step(scaler, optimizer, skipped, number)
        optimizer.zero_grad()
        return not torch.equal(before, layer.weight)  # the step was taken

    assert step(False, 1) and skipped.in_a_row == 0
    assert not step(True, 2) and not step(True, 3) and skipped.in_a_row == 2
    assert step(False, 4) and (skipped.in_a_row, skipped.total) == (0, 2)  # a good step resets the run of skips
    assert not step(True, 5) and not step(True, 6)
    with pytest.raises(UserError, match=r"overflowed 3 steps in a row \(up to step 7.*train\.max_skipped_steps"):
        step(True, 7)
    SkippedSteps(limit=0).update(2.0, 1.0, 1)  # 0: never stops


def test_out_of_memory_becomes_advice(tiny_cfg):
    with pytest.raises(UserError) as err, out_of_memory_advice(tiny_cfg()):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "train.batch_size=4, data.seq_len=64" in str(err.value) and "train.grad_accum" in str(err.value)
    with pytest.raises(ValueError), out_of_memory_advice(tiny_cfg()):  # anything else passes through untouched
        raise ValueError("x")


# ---- through run.py: exit status 2, one line, nothing started ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_faults_are_one_line_and_leave_no_running_run(tmp_path, token_cache, store):
    """Several `run.py` calls at once (each spends seconds importing): bad data, a config error, an unusable out_dir."""
    out = store
    bad = write_lines(tmp_path / "bad.jsonl", [*corpus_lines(5), b"{nope"])
    (tmp_path / "afile").write_text("a file, not a folder")
    tiny = [f"{k}={v}" for k, v in TINY.items()] + [f"data.cache_dir={token_cache}"]
    calls = {
        "data": [*tiny, f"data.path={bad}", f"out_dir={out}"],
        "config": [*tiny, "data.seq_len=64", "model.max_position_embeddings=32", f"out_dir={tmp_path / 'never'}"],
        "out_dir": [*tiny, f"out_dir={tmp_path / 'afile' / 'results'}"],
    }

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(calls, pool.map(lambda args: run_cli(*args, timeout=120), calls.values())))

    assert_one_line_error(done["data"], "line 6 of", "bad.jsonl", "data.skip_bad_lines=true")
    (run,) = all_runs(registry.build("baseline", [f"out_dir={out}"]))
    assert run.info.status == "FAILED" and "line 6 of" in run.data.tags["end_reason"]

    assert_one_line_error(done["config"], "data.seq_len (64) exceeds model.max_position_embeddings (32)")
    assert not (tmp_path / "never").exists()  # refused before any store or folder was made

    assert_one_line_error(done["out_dir"], "cannot create the MLflow store folder", "afile", "tracking.uri")


# ---- tracking server unreachable at the start, or lost in the middle of a run ----


def wait_until_healthy(server: subprocess.Popen, uri: str, log) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start: " + open(log).read()[-2000:])
            time.sleep(0.2)


def test_tracking_server_unreachable_at_start_fails_fast_and_lost_mid_run_goes_offline(tmp_path, token_cache, empty_store):  # noqa: F811
    shutil.copy(empty_store, tmp_path / "s.db")
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as log_file:  # a real server on loopback, in its own process group so that all of it can be killed
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}", "--default-artifact-root",
             str(tmp_path / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=lambda: os.nice(19),  # the timed run below goes first
        )
    try:
        # while it starts: a run against a port where nothing listens
        tiny = [f"{k}={v}" for k, v in {**TINY, **FAST}.items()] + [f"data.cache_dir={token_cache}"]
        dead = f"http://127.0.0.1:{free_port()}"
        started = time.monotonic()
        proc = run_cli(*tiny, f"tracking.uri={dead}", f"out_dir={tmp_path / 'unreached'}", timeout=60)
        assert_one_line_error(proc, f"MLflow tracking server {dead} is unreachable", "tracking.enabled=false")
        assert time.monotonic() - started < 60 and "parameters" not in proc.stdout  # no minutes of retries; failed before building a model
        assert not (tmp_path / "unreached" / "checkpoints").exists()

        uri = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, uri, log)
        check_losing_the_server_mid_run(server, uri, tmp_path / "s.db", tmp_path / "results", tiny)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def check_losing_the_server_mid_run(server, uri, db, out, tiny) -> None:
    """Kill the server once the run has logged its first checkpoint: training goes on, and what the server missed goes offline."""
    steps = 120
    args = [*tiny, "model.hidden_size=32", "data.seq_len=32", f"train.max_steps={steps}", "train.log_every=10", "train.eval_every=0",
            "train.eval_batches=1", "train.checkpoint_every=20", "train.threads=1", f"tracking.uri={uri}", f"out_dir={out}"]
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}  # each failed call: well under a second
    trainer = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    deadline = time.monotonic() + 90
    while last_logged_step(db) < 20 and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    stdout, stderr = trainer.communicate(timeout=120)
    on_server = last_logged_step(db)
    assert 20 <= on_server < steps, (on_server, stderr[-2000:])  # killed mid-run

    assert trainer.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.strip()]
    (run_id,) = [p.stem for p in (out / "offline").glob("*.jsonl")]
    fallback = out / "offline" / f"{run_id}.jsonl"
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: lost the MLflow tracking server during run {run_id} (")
    assert f"; what it missed is in {fallback}; upload it with `python run.py sync out_dir={out}`" in warnings[0]
    records = [json.loads(line) for line in fallback.read_text().splitlines()]
    offline_steps = {r["step"] for r in records if r.get("metric") == "train/loss"}
    assert set(range(on_server + 1, steps + 1)) <= offline_steps  # every step the server missed, through the last one
    assert any(r.get("metric") == "final/val_loss" and r["step"] == steps for r in records)
    assert records[-1] == {"status": "FINISHED", "end_reason": None}
    assert (out / "checkpoints" / run_id / f"step_{steps:08d}.pt").exists()  # the checkpoints stayed on local disk


# ---- sweeps: two workers on the default SQLite storage, one killed mid-trial ----


SWEEP = {**TINY, **FAST, "model.hidden_size": 32, "data.seq_len": 32, "train.eval_every": 10, "train.eval_batches": 1, "train.threads": 1,
         "sweep.pruner": "none", "sweep.confirm_seeds": 0, "sweep.eval_seeds": 0}


def test_two_workers_on_sqlite_one_killed_mid_trial_the_other_finishes_the_study(store, token_cache):
    out = store
    args = [str(REPO / "run.py"), "exp=lr_sweep", "sweep.n_trials=3", f"out_dir={out}", f"data.cache_dir={token_cache}",
            "sweep.heartbeat_s=1", "sweep.grace_s=4"]
    # trials of ~5 s: long enough that both workers, started together, are inside one at the same time
    args += [f"{k}={v}" for k, v in {**SWEEP, "train.max_steps": 200}.items()]
    workers = [subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    storage = f"sqlite:///{out / 'optuna.db'}"  # the default storage

    def running() -> list:
        """Trials inside training: taken and with their MLflow child run open (the kill must land there)."""
        try:
            trials = optuna.load_study(study_name="lr_sweep-sweep", storage=storage).get_trials()
            return [t for t in trials if t.state == TrialState.RUNNING and CHILD_RUN_ATTR in t.user_attrs]
        except Exception:  # not created yet
            return []

    deadline = time.monotonic() + 120
    while len(inside := running()) < 2 and time.monotonic() < deadline and all(w.poll() is None for w in workers):
        time.sleep(0.1)
    assert len(inside) == 2, [w.poll() for w in workers]  # both workers are inside a trial: kill one there
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    _, stderr = workers[1].communicate(timeout=240)
    assert workers[1].returncode == 0, stderr[-3000:]
    trials = optuna.load_study(study_name="lr_sweep-sweep", storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert len(finished) == 3 and len(dead) == 1 and len(trials) == 4  # the dead worker's trial ran again
    runs = all_runs(registry.build("lr_sweep", [*args[2:]]))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["sweep.trial_number"]) for r in children) == sorted(t.number for t in trials)
    (dead_run,) = [r for r in children if r.info.run_id == dead[0].user_attrs[CHILD_RUN_ATTR]]
    assert dead_run.info.status == "FAILED" and "no heartbeat" in dead_run.data.tags["end_reason"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FINISHED"]


# ---- load: many trials in one process ----


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_thirty_trials_in_one_process_do_not_leak_memory(store, token_cache):
    values = {**SWEEP, "model.hidden_size": 16, "model.num_hidden_layers": 1, "model.num_attention_heads": 2, "model.num_key_value_heads": 1, "data.seq_len": 16,
              "train.batch_size": 2, "train.max_steps": 3, "train.warmup_steps": 0, "train.eval_every": 0, "train.log_every": 3,
              "out_dir": str(store), "data.cache_dir": token_cache}
    cfg = registry.build("lr_sweep", {**values, "sweep.n_trials": 3})
    run_sweep(cfg)
    after_three = rss_bytes()
    cfg.sweep.n_trials = 30  # the same study, 27 more trials
    study = run_sweep(cfg)
    after_thirty = rss_bytes()
    assert len(study.trials) == 30 and all(t.state == TrialState.COMPLETE for t in study.trials)
    print(f"RSS after 3 trials {after_three / 2**20:.0f} MiB, after 30 {after_thirty / 2**20:.0f} MiB")
    assert after_thirty <= 1.10 * after_three
