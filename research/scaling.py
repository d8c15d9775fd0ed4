"""`exp=scaling`: model shapes x compute budgets trained as one Optuna study, a fitted law, and a held-out budget predicted before it trains.

Every (shape, budget, seed) cell is a trial of the ordinary study machinery (research/sweep.py): the
recipe's list of cells is queued with fixed parameters (the model's shape, train.max_steps, warmup and
lr), any number of workers on one storage drain the queue, a dead worker's trial is queued again, and
rerunning the command resumes. A cell of budget C trains D = C / (FLOPs per token x tokens per step)
steps, FLOPs per token being accounting.flops_per_token (6 N' + 12 L H Q T, where N' counts every
weight used in a matmul, the output head included).

Once every fitted cell has finished, the first worker to get there fits the law
(research/scaling_fit.py), picks the compute-optimal shape at the held-out budget, and stores the
prediction with its 90% interval on the study and the parent run, before the held-out cell is queued.
The held-out run then trains, and the report (research/scaling_report.py) says whether the interval
covered its test loss.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import optuna
from mlflow.entities import Metric, Param, RunTag
from omegaconf import DictConfig
from optuna.trial import TrialState
from rich.console import Console

from research import scaling_fit as fits
from research.config import apply_overrides
from research.errors import UserError
from research.scaling_plan import (
    BUDGET_ATTR, FIT_STAGE, HOLDOUT_STAGE, LEVEL, PLAN_ATTR, PREDICTION_ATTR, SHAPE_ATTR, Plan, Result, cell_space, holdout_choices, make_cell,
    make_plan, train_tokens,
)
from research.scaling_report import report
from research.store_url import parse
from research.study_plan import SEED_ATTR, STAGE_ATTR, TEST_LOSS_ATTR
from research.study_storage import open_storage, storage_url
from research.sweep import close_parent_run, open_parent_run, open_study, refuse_torchrun, run_queued_trials, stale_trial_callback
from research.tracking_store import connect, tracking_uri


def study_config(cfg: DictConfig, n_cells: int) -> DictConfig:
    """The trials' base config: taken like a grid's (no confirm or evaluate stage, nothing pruned), with the report written here instead."""
    grid = copy.deepcopy(cfg)
    apply_overrides(grid, {"sweep.sampler": "grid", "sweep.eval_seeds": 0, "sweep.confirm_seeds": 0, "sweep.pruner": "none", "sweep.n_trials": n_cells})
    return grid


def run_scaling(cfg: DictConfig) -> optuna.Study:
    """Train the fitted cells, predict the held-out run, train it, report: each step done by whichever worker gets there."""
    refuse_torchrun()
    plan = make_plan(cfg, train_tokens(cfg))
    console = Console()
    name = cfg.sweep.study_name or cfg.exp
    url = storage_url(cfg)
    client = connect(tracking_uri(cfg)) if cfg.tracking.enabled else None
    storage = open_storage(url, cfg.sweep, stale_trial_callback(client, cfg.sweep.max_retries))
    space = cell_space(plan, cfg)
    grid_cfg = study_config(cfg, len(plan.fit))
    study, created = open_study(name, storage, optuna.pruners.NopPruner(), grid_cfg, space, [(c.params(), c.attrs()) for c in plan.fit])
    check_same_plan(study, plan, name)
    console.print(f"[bold]scaling study[/] {name} ({'new' if created else 'resumed'}): {len(plan.sizes)} sizes x {len(set(c.budget for c in plan.fit))} "
                  f"budgets x {cfg.scaling.seeds} seed(s), then the held-out budget {plan.holdout_budget:.3g} FLOPs; in {parse(url).masked}")
    parent = open_parent_run(client, study, created, grid_cfg, name, url, space)
    log_scaling_params(client, parent, cfg)
    interrupted = True
    try:
        run_queued_trials(study, grid_cfg, space, client, parent, console)
        prediction = predict_once(study, plan, cfg, client, parent, console)
        holdout = [make_cell(plan.size(prediction["shape"]), plan.holdout_budget, cfg.seed + i, HOLDOUT_STAGE, cfg) for i in range(cfg.scaling.holdout_seeds)]
        grid_cfg.sweep.n_trials = len(plan.fit) + len(holdout)
        open_study(name, storage, optuna.pruners.NopPruner(), grid_cfg, space, [(c.params(), c.attrs()) for c in plan.fit + holdout])
        run_queued_trials(study, grid_cfg, space, client, parent, console)
        report(study, cfg, plan, results(study, plan, cfg), prediction, client, parent, parse(url).shown(), console)
        interrupted = False
    finally:
        close_parent_run(client, parent, study, interrupted, console)
    return study


def check_same_plan(study: optuna.Study, plan: Plan, name: str) -> None:
    """A study keeps the cells it was created with: a rerun with other scaling settings would mix two designs in one fit."""
    cells = json.dumps([[c.params(), c.attrs()] for c in plan.fit], sort_keys=True)
    if PLAN_ATTR not in study.user_attrs:
        study.set_user_attr(PLAN_ATTR, cells)
    elif study.user_attrs[PLAN_ATTR] != cells:
        raise UserError(f"study '{name}' was created with other scaling, data or train settings; rerun it with those, or start a new study "
                        "with sweep.study_name=NAME")


def log_scaling_params(client, parent: str | None, cfg: DictConfig) -> None:
    """The design (sizes, budgets, rules) as the parent run's params, once."""
    if client is None or parent is None or "scaling.sizes" in client.get_run(parent).data.params:
        return
    values = {f"scaling.{key}": value for key, value in cfg.scaling.items()}
    client.log_batch(parent, params=[Param(k, str(list(v) if not isinstance(v, (int, float, str)) else v)) for k, v in values.items()])


def results(study: optuna.Study, plan: Plan, cfg: DictConfig) -> list:
    """Every completed cell with its losses, fitted and held-out, in trial order."""
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get(SHAPE_ATTR) and TEST_LOSS_ATTR in trial.user_attrs:
            cell = make_cell(plan.size(trial.user_attrs[SHAPE_ATTR]), trial.user_attrs[BUDGET_ATTR], trial.user_attrs[SEED_ATTR],
                             trial.user_attrs[STAGE_ATTR], cfg)
            found.append(Result(cell, trial.number, float(trial.user_attrs[TEST_LOSS_ATTR]), float(trial.value)))
    return found


def predict_once(study: optuna.Study, plan: Plan, cfg: DictConfig, client, parent: str | None, console: Console) -> dict:
    """The held-out prediction: made by the first worker to finish the fitted cells, then read back by every other worker and rerun."""
    if PREDICTION_ATTR not in study.user_attrs:
        fitted = [r for r in results(study, plan, cfg) if r.cell.stage == FIT_STAGE]
        if len({(r.cell.size.name, r.cell.budget) for r in fitted}) < len({(c.size.name, c.budget) for c in plan.fit}):
            raise UserError("some fitted cells failed (see the study's trials): rerun the command to train them again before the held-out prediction")
        prediction = predict(fitted, plan, cfg)
        study.set_user_attr(PREDICTION_ATTR, prediction)
        log_prediction(client, parent, prediction)
    prediction = study.user_attrs[PREDICTION_ATTR]
    console.print(f"[bold]prediction[/] before training the held-out run: {prediction['shape']} at {prediction['budget']:.3g} FLOPs "
                  f"reaches test loss {prediction['loss']:.4f}, {LEVEL:.0%} interval [{prediction['low']:.4f}, {prediction['high']:.4f}]")
    return prediction


def predict(fitted: list, plan: Plan, cfg: DictConfig) -> dict:
    """Fit L(N, D) to the fitted cells, take the shape with the lowest predicted loss at the held-out budget, and its 90% prediction interval."""
    n, d, loss = (np.array([getattr(r, key) for r in fitted], float) for key in ("n", "tokens", "test_loss"))
    law = fits.fit_law(n, d, loss)
    laws = fits.bootstrap_laws(law, n, d, loss, cfg.scaling.bootstrap, cfg.seed)
    choices = [make_cell(size, plan.holdout_budget, cfg.seed, HOLDOUT_STAGE, cfg) for size in holdout_choices(plan, cfg)]
    best = min(choices, key=lambda cell: law.loss(cell.size.n, cell.tokens))
    samples = fits.predictive_samples(laws, best.size.n, best.tokens, fits.log_residuals(law, n, d, loss), cfg.seed)
    low, high = fits.percentile_interval(samples, LEVEL)
    return {"shape": best.size.name, "budget": plan.holdout_budget, "n": best.size.n, "tokens": best.tokens, "loss": float(law.loss(best.size.n, best.tokens)),
            "low": low, "high": high, "law": law.as_dict(), "bootstrap": [list(b.as_dict().values()) for b in laws],
            "choices": {cell.size.name: float(law.loss(cell.size.n, cell.tokens)) for cell in choices}, "cells": len(fitted)}


def log_prediction(client, parent: str | None, prediction: dict) -> None:
    """On the parent run before the held-out run starts: the metric's timestamp says when the prediction was made."""
    if client is None or parent is None:
        return
    now = int(time.time() * 1000)
    metrics = {"prediction/test_loss": prediction["loss"], "prediction/low": prediction["low"], "prediction/high": prediction["high"],
               "prediction/non_embedding_params": float(prediction["n"]), "prediction/tokens": float(prediction["tokens"])}
    text = (f"{prediction['shape']} at {prediction['budget']:.4g} FLOPs: test loss {prediction['loss']:.4f}, "
            f"{LEVEL:.0%} interval [{prediction['low']:.4f}, {prediction['high']:.4f}] (from {prediction['cells']} cells)")
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag("scaling.prediction", text), RunTag("scaling.holdout_shape", prediction["shape"])])
