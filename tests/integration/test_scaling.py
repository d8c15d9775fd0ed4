"""exp=scaling end to end on tiny shapes: 3 sizes x 2 budgets and the held-out run, a worker that dies mid-study, and the rerun that finishes it."""

import json
import shutil
import time

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, TINY
from research import registry, sweep
from research.errors import UserError
from research.runner import run_experiment
from research.scaling_plan import BUDGET_ATTR, PREDICTION_ATTR, SHAPE_ATTR
from research.study_plan import SEED_ATTR, STAGE_ATTR
from research.tracking_store import tracking_uri
from test_sweep import empty_store  # noqa: F401 (a fixture: a migrated MLflow store to copy)

SCALING = {**TINY, "data.path": str(REPO / "tests" / "data" / "tang_song.jsonl"), "train.eval_every": 0, "train.sample_tokens": 0, "train.test_batches": 4, "train.threads": 1,
           "tracking.log_hf_model": False, "scaling.sizes": ["16x1", "32x1", "48x2"], "scaling.budgets": [6e9, 1.2e10], "scaling.holdout_sizes": ["64x2"],
           "scaling.holdout_seeds": 1, "scaling.bootstrap": 10, "sweep.heartbeat_s": 1, "sweep.grace_s": 2}


class WorkerKilled(BaseException):
    """What the study sees of a worker killed mid-trial: its trial stays RUNNING and no one finishes it."""


@pytest.fixture
def scaling_cfg(tmp_path, token_cache, empty_store):  # noqa: F811
    (tmp_path / "results").mkdir()
    shutil.copy(empty_store, tmp_path / "results" / "mlflow.db")

    def make(**overrides):
        values = {**SCALING, "out_dir": str(tmp_path / "results"), "data.cache_dir": token_cache, "sweep.report_dir": str(tmp_path / "committed")}
        return registry.build("scaling", {**values, **overrides})

    return make


def cell(trial) -> tuple:
    return trial.user_attrs[SHAPE_ATTR], trial.user_attrs[BUDGET_ATTR], trial.user_attrs[SEED_ATTR], trial.user_attrs[STAGE_ATTR]


def test_a_killed_worker_is_resumed_without_repeating_a_cell_and_the_held_out_run_is_predicted_first(scaling_cfg, tmp_path, monkeypatch):
    cfg = scaling_cfg()
    real_train, trained = sweep.train, []

    def train(trial_cfg, hooks):
        trained.append((trial_cfg.model.hidden_size, trial_cfg.model.num_hidden_layers, trial_cfg.train.max_steps))
        if len(trained) == 3 and kill_third:
            raise WorkerKilled
        return real_train(trial_cfg, hooks)

    monkeypatch.setattr(sweep, "train", train)
    kill_third = True
    with pytest.raises(WorkerKilled):
        run_experiment(cfg)
    first = list(trained)
    time.sleep(3.1)  # past sweep.grace_s: the dead worker's trial is failed and queued again by the next worker
    kill_third, trained[:] = False, []
    study = run_experiment(scaling_cfg())
    trials = study.get_trials()

    fitted = [t for t in trials if t.user_attrs[STAGE_ATTR] == "grid"]
    done = [cell(t) for t in fitted if t.state == TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 6  # every cell once
    assert [t.state for t in fitted].count(TrialState.FAIL) == 1 and len(fitted) == 7  # the dead worker's trial, then its retry
    assert len(trained) == 4 + 1 and first[2] in trained and not set(first[:2]) & set(trained[:4])  # the 2 finished cells not again
    (holdout,) = [t for t in trials if t.user_attrs[STAGE_ATTR] == "holdout"]
    prediction = study.user_attrs[PREDICTION_ATTR]
    assert holdout.state == TrialState.COMPLETE and holdout.user_attrs[SHAPE_ATTR] == prediction["shape"]
    assert holdout.user_attrs[BUDGET_ATTR] == pytest.approx(4 * 1.2e10)
    assert prediction["low"] < prediction["loss"] < prediction["high"] and prediction["cells"] == 6

    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(study.user_attrs[sweep.PARENT_RUN_ATTR])
    child = client.get_run(holdout.user_attrs[sweep.CHILD_RUN_ATTR])
    (predicted,) = client.get_metric_history(parent.info.run_id, "prediction/test_loss")
    assert predicted.value == pytest.approx(prediction["loss"]) and predicted.timestamp <= child.info.start_time  # logged before it trained
    assert parent.info.status == "FINISHED" and parent.data.params["scaling.sizes"] == "['16x1', '32x1', '48x2']"
    assert parent.data.metrics["holdout/test_loss"] == pytest.approx(holdout.user_attrs["test_loss"])
    assert {"law/E", "law/A", "law/B", "law/alpha", "law/beta", "holdout/error_pct", "holdout/covered"} <= set(parent.data.metrics)
    summary = (tmp_path / "committed" / "summary.md").read_text()
    assert "**prediction**" in summary and "**Verdict: " in summary and f"{prediction['loss']:.4f}" in summary
    assert summary.count("| holdout |") == 1 and summary.count("| grid |") == 6
    for plot in ("loss_vs_compute", "isoflop", "predicted_vs_actual"):
        assert (tmp_path / "committed" / f"{plot}.png").stat().st_size > 0
    assert {"summary.md", "summary.html", "isoflop.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    trained[:] = []
    run_experiment(scaling_cfg())  # a rerun of a finished study trains nothing and keeps its prediction
    assert trained == [] and json.dumps(study.user_attrs[PREDICTION_ATTR]) == json.dumps(prediction)


@pytest.mark.parametrize("overrides, message", [
    ({"scaling.sizes": ["16x1", "32y1", "48x2"]}, "WIDTHxDEPTH"),
    ({"scaling.budgets": [6e9]}, "at least 2 positive"),
    ({"scaling.holdout_factor": 2.0}, "holdout_factor must be >= 4"),
    ({"scaling.budgets": [1e8, 6e9]}, "trains 1 steps"),
    ({"scaling.budgets": [6e9, 1e13]}, "repeats the training split"),
])
def test_bad_designs_are_one_line_errors_before_anything_trains(scaling_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        run_experiment(scaling_cfg(**overrides))
