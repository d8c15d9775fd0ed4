"""A trial whose worker went silent past the grace period: another worker fails it and ends its MLflow run, once.

The silent worker here is one whose heartbeat interval is longer than the grace period, so its
trial looks dead while it trains; a second Study on the same storage (another worker) fails it
the way every worker does before it takes a trial (`fail_stale_trials`).
"""

import shutil
import threading
import time
from types import SimpleNamespace

import optuna
from optuna.trial import TrialState
from rich.console import Console

from conftest import REPO, TINY
from research import registry, sweep
from research.names import END_REASON, SWEEP_STATE
from research.sweep import CHILD_RUN_ATTR, STEPS_ATTR, WORKER_LOST, active_space, open_storage, run_trial, stale_trial_callback
from research.tracking_store import connect
from test_sweep import empty_store  # noqa: F401 (a fixture: a migrated MLflow store to copy)

GRACE_S = 1


def test_a_stale_trials_run_is_ended_once_by_the_worker_that_failed_it(tmp_path, token_cache, empty_store, monkeypatch):  # noqa: F811
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = registry.build("lr_sweep", {**TINY, "train.max_steps": 40, "train.eval_every": 20, "train.eval_batches": 1, "train.sample_tokens": 0,
                                      "data.path": str(REPO / "tests" / "data" / "tang_song.jsonl"), "data.cache_dir": token_cache,
                                      "out_dir": str(tmp_path), "tracking.log_hf_model": False, "sweep.n_trials": 1})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    silent = open_storage(url, SimpleNamespace(heartbeat_s=60, grace_s=GRACE_S), stale_trial_callback(client, 1))  # beats once, at the start
    study = optuna.create_study(study_name="s", storage=silent)
    trial = study.ask()

    other = optuna.load_study(study_name="s", storage=open_storage(url, SimpleNamespace(heartbeat_s=1, grace_s=GRACE_S), stale_trial_callback(client, 1)))
    failed_at = []

    def other_worker() -> None:
        deadline = time.monotonic() + 120
        while not failed_at and time.monotonic() < deadline:
            time.sleep(0.2)
            optuna.storages.fail_stale_trials(other)  # what a worker does before it takes a trial
            if other.trials[0].state == TrialState.FAIL:
                failed_at.append(client.get_run(other.trials[0].user_attrs[CHILD_RUN_ATTR]).info)

    real_train = sweep.train

    def train_once_failed(*args, **kwargs):  # the silent worker trains only once the other one has failed its trial:
        deadline = time.monotonic() + 120  # on fast cores a tiny trial would end before its heartbeat goes stale
        while not failed_at and time.monotonic() < deadline:
            time.sleep(0.1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(sweep, "train", train_once_failed)
    watcher = threading.Thread(target=other_worker)
    watcher.start()
    try:
        space = active_space(cfg, registry.search_space("lr_sweep"))
        run_trial(study, trial, cfg, space, client, None, Console(quiet=True))  # trains to the end, then finds its trial failed
    finally:
        failed_at.append(None)  # stop the watcher if it has not fired
        watcher.join()

    ended = failed_at[0]
    assert ended is not None and ended.status == "FAILED"  # the other worker failed the trial while it trained, and ended its run
    run = client.get_run(ended.run_id)
    assert run.info.end_time == ended.end_time and run.info.status == "FAILED"  # ... and the silent worker did not end it again
    assert run.data.tags[SWEEP_STATE] == "FAIL" and run.data.tags[END_REASON] == WORKER_LOST
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and STEPS_ATTR not in trials[0].user_attrs and "test_loss" not in trials[0].user_attrs  # nothing written to it
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]  # queued again by the worker that failed it
