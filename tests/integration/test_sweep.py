"""Optuna sweeps end to end: tiny studies in temporary storages, logged to a temporary MLflow store."""

import gc
import shlex
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import REPO, TINY, run_cli
from research import registry, sweep
from research.search_space import Float, Int
from research.errors import UserError
from research.model import MiniMindForCausalLM
from research.sweep import CHILD_RUN_ATTR, END_REASON_ATTR, PARENT_RUN_ATTR, run_sweep
from research.tracking_store import artifact_root, connect, experiment_id, tracking_uri

STUDY = "lr_sweep-sweep"  # the default name for exp=lr_sweep
SWEEP = {**TINY, "train.max_steps": 8, "train.eval_every": 4, "train.eval_batches": 1, "train.sample_tokens": 0, "sweep.confirm_seeds": 0,
         "sweep.eval_seeds": 0, "data.path": str(REPO / "tests" / "data" / "tang_song.jsonl")}  # 100k tokens: tokenized in a blink


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A fresh MLflow SQLite store, created once: each test starts from a copy (creating one takes seconds)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    connect(f"sqlite:///{db}")
    return db


@pytest.fixture
def sweep_cfg(tmp_path, token_cache, empty_store):
    (tmp_path / "results").mkdir()
    shutil.copy(empty_store, tmp_path / "results" / "mlflow.db")

    def make(**overrides):
        values = {**SWEEP, "out_dir": str(tmp_path / "results"), "data.cache_dir": str(token_cache)}
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return registry.build("lr_sweep", values)

    return make


def runs_of(cfg):
    """(parent runs, {trial number: [child runs]}) of the study's MLflow experiment."""
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("lr_sweep").experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[int, list] = {}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            children.setdefault(int(run.data.tags["sweep.trial_number"]), []).append(run)
    return parents, children


def live_models() -> int:
    gc.collect()
    return sum(type(o) is MiniMindForCausalLM for o in gc.get_objects())


def test_study_logs_one_parent_and_a_child_per_trial_and_resumes_without_duplicates(sweep_cfg, tmp_path):
    models_before = live_models()
    cfg = sweep_cfg(sweep__n_trials=4, sweep__report_dir=str(tmp_path / "committed"))
    study = run_sweep(cfg)
    assert live_models() == models_before  # no trial's model outlives it
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)

    client = MlflowClient(tracking_uri(cfg))
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    parent = parents[0]
    assert study.user_attrs[PARENT_RUN_ATTR] == parent.info.run_id
    assert parent.data.tags["sweep.study_name"] == STUDY and parent.data.tags["sweep.storage"].startswith("sqlite:///")
    assert parent.info.run_name == "lr_sweep" and parent.data.params["sweep.n_trials"] == "4" and parent.data.params["sweep.eval_seeds"] == "0"
    assert not any(key.startswith(("sweep.", "bench.")) for child in sum(children.values(), []) for key in child.data.params)
    assert "log-uniform" in parent.data.tags["sweep.space.train.lr"] and parent.data.tags["sweep.pruner"].startswith("MedianPruner")
    for trial in trials:
        (child,) = children[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.user_attrs[CHILD_RUN_ATTR] == child.info.run_id
        assert child.data.tags["sweep.state"] == trial.state.name
        assert child.info.status == "FINISHED" and child.info.run_name == f"lr_sweep/trial-{trial.number:03d}"  # pruned: see sweep.state
        for key in ["train.lr", "train.warmup_steps", "train.min_lr_ratio"]:
            assert child.data.params[key] == str(trial.params[key])
        losses = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, max(trial.intermediate_values) + 1))
    searched = sorted((t for t in trials if t.user_attrs["stage"] == "search" and t.state == TrialState.COMPLETE), key=lambda t: t.value)
    best = searched[0]  # no confirmation seeds: the best searched trial (the default is the reference, not a candidate)
    assert parent.data.tags["best.trial_numbers"] == str(best.number)
    assert parent.data.metrics["best/choice_score"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.html", "optimization_history.png", "intermediate_values.png", "config.yaml"} <= artifacts
    for folder in (tmp_path / "results" / "sweeps" / STUDY, tmp_path / "committed"):  # the study's own folder, and sweep.report_dir
        summary = (folder / "summary.md").read_text()
        assert f"**answer**: train.lr={best.params['train.lr']:.4g}" in summary and f"\n| {best.number} | " in summary
        assert "| val loss | test loss | val bpb | test bpb |" in summary and f"{best.user_attrs['val_bpb']:.4f}" in summary
        candidates = min(2, len(searched))
        assert summary.count("\n| ") == 2 + candidates + 4  # two headers, a row per candidate and one per trial
        assert (folder / "optimization_history.png").stat().st_size > 0
        page = (folder / "summary.html").read_text()  # self-contained: the plots are embedded, the best highlighted
        assert page.count('<img src="data:image/png;base64,') == len(list(folder.glob("*.png"))) >= 2
        assert f'<tr class="best"><td>{best.number}</td>' in page and page.count("<tr") == 2 + candidates + 4

    run_ids = {r.info.run_id for r in [parent, *sum(children.values(), [])]}
    run_sweep(sweep_cfg(sweep__n_trials=4))  # the same command again: nothing left to do
    parents, children = runs_of(cfg)
    assert {r.info.run_id for r in [*parents, *sum(children.values(), [])]} == run_ids

    study = run_sweep(sweep_cfg(sweep__n_trials=6))  # the total rises by two: two more trials, same parent
    parents, children = runs_of(cfg)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3, 4, 5] and sorted(children) == [0, 1, 2, 3, 4, 5]
    assert all(len(runs) == 1 for runs in children.values())


def test_two_workers_on_one_journal_share_the_study(sweep_cfg, tmp_path, token_cache):
    journal, out_dir = tmp_path / "study.journal", tmp_path / "results"
    args = ["exp=lr_sweep", "sweep.n_trials=4", f"sweep.storage=journal:{journal}", f"out_dir={out_dir}", f"data.cache_dir={token_cache}"]
    args += [f"{k}={v}" for k, v in SWEEP.items()]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run_cli(*args, timeout=240), range(2)))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.is_finished() for t in trials)
    parents, children = runs_of(sweep_cfg())
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    for trial in trials:
        (child,) = children[trial.number]
        assert trial.user_attrs[CHILD_RUN_ATTR] == child.info.run_id
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_median_pruner_stops_trials_with_absurd_learning_rates(sweep_cfg):
    cfg = sweep_cfg(sweep__n_trials=4, sweep__pruner="median", sweep__prune_after_trials=1, sweep__prune_after_steps=4)
    trials = run_sweep(cfg, space={"train.lr": Float(1e-3, 10.0, log=True)}).get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    _, children = runs_of(cfg)
    client = MlflowClient(tracking_uri(cfg))
    for trial in pruned:
        step = max(trial.intermediate_values)
        assert step < cfg.train.max_steps
        others = [t.intermediate_values[step] for t in complete if t.number < trial.number]
        assert min(v for s, v in trial.intermediate_values.items() if s <= step) > statistics.median(others)  # the median rule held
        (child,) = children[trial.number]
        assert child.info.status == "FINISHED" and child.data.tags["end_reason"].startswith(f"pruned at step {step}")
        assert max(m.step for m in client.get_metric_history(child.info.run_id, "val/loss")) == step  # logged up to the stop


def test_a_diverging_trial_fails_and_the_study_goes_on_optimizing_bpb(sweep_cfg):
    cfg = sweep_cfg(sweep__n_trials=3, sweep__pruner="none", sweep__enqueue_default=False, sweep__objective="bpb")
    trials = run_sweep(cfg, space={"train.lr": Float(1e-3, 1e9, log=True)}).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and any(t.state == TrialState.COMPLETE and t.number > failed[0].number for t in trials)
    _, children = runs_of(cfg)
    client = MlflowClient(tracking_uri(cfg))
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):  # the study's value is the trial's final val/bpb, not its loss
        (child,) = children[trial.number]
        assert trial.value == child.data.metrics["val/bpb"] != child.data.metrics["val/loss"]
        assert trial.intermediate_values == {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val/bpb")}
    summary = (Path(cfg.out_dir) / "sweeps" / "lr_sweep-sweep" / "summary.md").read_text()
    assert "| val bpb | test bpb |" in summary
    for trial in failed:
        assert "NonFiniteLoss" in trial.user_attrs[END_REASON_ATTR] and trial.params["train.lr"] > 100
        (child,) = children[trial.number]
        assert child.info.status == "FAILED" and "NonFiniteLoss" in child.data.tags["end_reason"]
        assert child.data.tags["sweep.state"] == "FAIL"


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_dead_workers_trial_is_failed_and_queued_again(sweep_cfg, tmp_path, kind):
    url = str(tmp_path / "study.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = sweep_cfg(sweep__n_trials=2, sweep__storage=url, sweep__heartbeat_s=1, sweep__grace_s=2)
    storage = sweep.open_storage(url, cfg.sweep, on_stale=None)
    space = sweep.active_space(cfg, registry.search_space("lr_sweep"))
    study, _ = sweep.open_study(STUDY, storage, sweep.make_pruner(cfg), cfg, space)
    stale = sweep.take_queued_trial(study, cfg, space, 1, sweep.Console())  # a trial whose worker was killed, with its child run left RUNNING
    client = MlflowClient(tracking_uri(cfg))
    run_id = client.create_run(experiment_id(client, "lr_sweep", artifact_root(cfg))).info.run_id
    stale.set_user_attr(CHILD_RUN_ATTR, run_id)
    storage.record_heartbeat(stale._trial_id)  # its last sign of life
    time.sleep(3.1)  # past the grace period (SQL storages keep heartbeats to the second)

    trials = run_sweep(cfg).get_trials()
    assert [t.state for t in trials][:1] == [TrialState.FAIL] and len(trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials[1:])  # n_trials finished, the dead one aside
    assert trials[2].system_attrs["failed_trial"] == 0  # the dead worker's trial, queued again
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags["end_reason"]
    parents, children = runs_of(cfg)
    assert [p.info.status for p in parents if p.info.run_id != run_id] == ["FINISHED"] and sorted(children) == [1, 2]


def test_bad_bounds_and_storages_are_one_line_errors(sweep_cfg):
    with pytest.raises(UserError, match="search space of train.lr: need low <= high"):
        run_sweep(sweep_cfg(sweep__n_trials=1), space={"train.lr": Float(1e-2, 1e-3, log=True)})
    with pytest.raises(UserError, match="search space names 'train.learning_rate', which is not a config key"):
        run_sweep(sweep_cfg(sweep__n_trials=1), space={"train.learning_rate": Float(1e-3, 1e-2)})
    with pytest.raises(UserError, match="'sweep.lr_min' is gone: a sweep searches its recipe's SEARCH_SPACE"):
        sweep_cfg(sweep__lr_min=1e-3)
    with pytest.raises(UserError, match="cannot open Optuna storage nosuchdb://u:\\*\\*\\*@host/x"):
        run_sweep(sweep_cfg(sweep__n_trials=1, sweep__storage="nosuchdb://u:secret@host/x"))


def test_search_confirm_evaluate_on_separate_seeds_and_the_retrain_command_repeats_the_trial(sweep_cfg, tmp_path):
    cfg = sweep_cfg(sweep__n_trials=3, sweep__confirm_top_k=1, sweep__confirm_seeds=1, sweep__eval_seeds=2, sweep__pruner="none")
    trials = run_sweep(cfg).get_trials()
    default = {"train.lr": cfg.train.lr, "train.warmup_steps": cfg.train.warmup_steps, "train.min_lr_ratio": cfg.train.min_lr_ratio}
    stages = [(t.user_attrs["stage"], t.user_attrs["seed"]) for t in trials]
    s = cfg.seed
    assert stages == [("default", s), ("search", s), ("search", s), ("confirm", s + 1),
                      ("evaluate", s + 1000), ("evaluate", s + 1001), ("evaluate", s + 1000), ("evaluate", s + 1001)]
    assert trials[0].params == pytest.approx(default) and all(t.state == TrialState.COMPLETE for t in trials)
    searched = min(trials[1:3], key=lambda t: t.value)
    assert trials[3].params == searched.params  # the best searched configuration, retrained at a new seed
    answer_eval, default_eval = trials[4:6], trials[6:8]
    assert all(t.params == searched.params for t in answer_eval) and all(t.params == pytest.approx(default) for t in default_eval)
    assert all(t.user_attrs["test_loss"] > 0 for t in answer_eval + default_eval)

    parents, children = runs_of(cfg)
    (parent,) = parents
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["sweep/total_steps"] == 8 * cfg.train.max_steps and sorted(children) == list(range(8))
    answer_test = [t.user_attrs["test_loss"] for t in answer_eval]
    default_test = [t.user_attrs["test_loss"] for t in default_eval]
    assert metrics["best/test_loss"] == pytest.approx(statistics.fmean(answer_test)) and metrics["best/test_loss_n"] == 2
    assert metrics["default/test_loss"] == pytest.approx(statistics.fmean(default_test))
    diffs = [a - b for a, b in zip(answer_test, default_test)]
    assert metrics["paired/test_loss_diff"] == pytest.approx(statistics.fmean(diffs)) and metrics["paired/n"] == 2
    assert tags["best.trial_numbers"] == "4,5" and "answer - default on test loss" in tags["best.verdict"]
    assert children[4][0].data.tags["sweep.stage"] == "evaluate" and children[4][0].data.metrics["test/loss"] == pytest.approx(answer_test[0])
    summary = (tmp_path / "results" / "sweeps" / STUDY / "summary.md").read_text()
    assert f"test loss at seeds [{s + 1000}, {s + 1001}]" in summary and "95% CI" in summary

    compared = run_cli("compare", parent.info.run_id, f"out_dir={cfg.out_dir}", f"out={tmp_path / 'compare.md'}")
    assert compared.returncode == 0, compared.stderr[-2000:]
    report = (tmp_path / "compare.md").read_text()
    assert f"| {s + 1000} | {answer_test[0]:.4f} | {default_test[0]:.4f} |" in report
    assert f"mean difference (A - B): **{statistics.fmean(diffs):+.4f}**" in report and "| train.lr |" in report

    command = shlex.split(tags["best.retrain_command"])
    assert command[:4] == ["python", "run.py", "exp=lr_sweep", "sweep.n_trials=0"]
    proc = run_cli(*command[2:], "tracking.experiment=retrain")
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("retrain").experiment_id])
    assert {k: float(v) for k, v in run.data.params.items() if k in default} == pytest.approx(searched.params)
    assert run.data.metrics["final/val_loss"] == pytest.approx(searched.value, abs=1e-5)  # the same training as the search trial


def test_a_grid_runs_every_point_at_every_seed(sweep_cfg):
    cfg = sweep_cfg(sweep__sampler="grid", sweep__grid_seeds=2, sweep__n_trials=4, sweep__pruner="none", sweep__enqueue_default=False)
    lr, ratio = cfg.train.lr, cfg.train.min_lr_ratio  # the recipe's values are one of the grid's points
    grid = {"train.lr": Float(1e-4, 1e-2, log=True, grid=(1e-3, lr)), "train.warmup_steps": Int(0, 4), "train.min_lr_ratio": Float(0.0, 1.0, grid=(ratio,))}
    trials = run_sweep(cfg, space=grid).get_trials()
    assert sorted((t.params["train.lr"], t.user_attrs["seed"]) for t in trials) == [(1e-3, 1337), (1e-3, 1338), (lr, 1337), (lr, 1338)]
    assert all(t.state == TrialState.COMPLETE and t.params["train.min_lr_ratio"] == ratio for t in trials)
    summary = (Path(cfg.out_dir) / "sweeps" / STUDY / "summary.md").read_text()
    assert f"| train.lr={lr:.4g} train.min_lr_ratio={ratio:.4g} (default) |" in summary  # the grid point with the recipe's values
    assert all("train.warmup_steps" not in t.params for t in trials)  # no grid values: the recipe's warmup
    with pytest.raises(UserError, match="sweep.sampler=grid needs sweep.n_trials = the grid's points x sweep.grid_seeds = 4"):
        run_sweep(sweep_cfg(sweep__sampler="grid", sweep__grid_seeds=2, sweep__n_trials=3), space=grid)
