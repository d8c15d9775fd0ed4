"""Optuna studies over any experiment: `run_sweep(cfg)`, what `run.py` does when `sweep.n_trials > 0`.

Each trial is the ordinary `train` loop with two more hooks: `MLflowHook` logs it as a child run
of the study's parent run, and `ReportToTrial` hands every validation loss to the pruner. The
study lives in an Optuna storage, so rerunning the same command resumes it and several workers
on one storage share it.

`sweep.n_trials` is the total, held as a queue: the worker that creates the study enqueues that
many trials (`study.enqueue_trial`), and every worker takes queued trials until none is left.
Taking one is the storage's own compare-and-set from WAITING to RUNNING (what `study.ask` does
with a queued trial), so any number of workers on SQLite, a journal file or PostgreSQL run
exactly `n_trials` trials without a lock (`study.optimize` asks before it can know that others emptied
the queue, so two workers finishing together ran one trial too many). Everything else is Optuna's:
the heartbeat thread of a running trial, failing the trials of dead workers
(`fail_stale_trials`, on the storage's `grace_period`) and queueing them again
(`RetryHeartbeatStaleTrialCallback`, up to `sweep.max_retries` times).
"""

from __future__ import annotations

import copy
import gc
import math
import time
import warnings

import optuna
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from research import distributed, names, registry
from research import search_space as spaces
from research.config import apply_overrides, to_yaml, valid_keys, validate
from research.errors import UserError
from research.run_naming import start_run, trial_run_name
from research.run_params import SWEEP_SECTIONS, TAG_CHARS, params_and_tags
from research.store_url import parse
from research.study_storage import open_storage, storage_url
from research.study_plan import BPB_ATTRS, SEARCHED, SEED_ATTR, STAGE_ATTR, STEPS_ATTR, TEST_LOSS_ATTR, default_params, duplicate_of, grid_seeds, plan
from research.sweep_report import summarise
from research.tracking import MLflowHook
from research.tracking_store import connect, tracking_uri
from research.trainer import Hooks, train

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run
QUEUED_ATTR = "n_trials_queued"  # study user attr: how many search (or grid) trials have been enqueued in all
STARTUP_TRIALS = 5  # TPE samples at random until this many trials finished, then models the good ones
CHILD_RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow child run
END_REASON_ATTR = names.END_REASON  # trial user attr: why a trial was pruned or failed
WORKER_LOST = "its worker stopped (no heartbeat)"
INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: the trial counts as failed, its run ends KILLED like any stopped run
TRIAL_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}  # a trial's run ends as its state says (sweep.state tells a pruned one)


def run_sweep(cfg: DictConfig, space: dict[str, spaces.Dimension] | None = None) -> optuna.Study:
    """Run queued trials until the study needs none (search, confirm, evaluate), then summarise it.

    `space` is what the search samples: by default the recipe's SEARCH_SPACE (research/search_space.py).
    """
    refuse_torchrun()
    space = active_space(cfg, space if space is not None else registry.search_space(cfg.exp))
    check_search_space(cfg, space)
    console = Console()
    name = cfg.sweep.study_name or f"{cfg.exp}-sweep"
    url = storage_url(cfg)
    client = connect(tracking_uri(cfg)) if cfg.tracking.enabled else None
    storage = open_storage(url, cfg.sweep, stale_trial_callback(client, cfg.sweep.max_retries))  # before MLflow: a bad storage URL fails at once
    study, created = open_study(name, storage, make_pruner(cfg), cfg, space)
    console.print(f"[bold]study[/] {name} ({'new' if created else 'resumed'}, {cfg.sweep.n_trials} trials) in {parse(url).masked}")
    parent_run_id = open_parent_run(client, study, created, cfg, name, url, space)
    interrupted = True
    try:
        run_queued_trials(study, cfg, space, client, parent_run_id, console)
        summarise(study, cfg, registry.build(cfg.exp), space, parse(url).shown(), client, parent_run_id, console)
        interrupted = False
    finally:
        close_parent_run(client, parent_run_id, study, interrupted, console)
    return study


def run_queued_trials(study: optuna.Study, cfg: DictConfig, space: dict[str, spaces.Dimension], client, parent_run_id: str | None,
                      console: Console) -> None:
    """Take and train queued trials until the study needs none (other workers' running trials waited for)."""
    while (trial := take_queued_trial(study, cfg, space, min(cfg.sweep.heartbeat_s, 5), console)) is not None:
        run_trial(study, trial, cfg, space, client, parent_run_id, console)
        gc.collect()  # the trial's model is unreachable now; free it before the next one is built


def refuse_torchrun() -> None:
    """A trial is one process's training run: under torchrun each rank would take a trial of its own while DDP trains one model."""
    if (ranks := distributed.launched_world_size()) > 1:
        raise UserError(f"a sweep cannot run under torchrun ({ranks} ranks): each rank would take its own trial while they all train one model; "
                        "start the same command as several single-process workers instead (one per GPU, e.g. CUDA_VISIBLE_DEVICES=0 python run.py ..., "
                        "all on one sweep.storage), or retrain one configuration under torchrun with sweep.n_trials=0")


# ---- search space ----


def active_space(cfg: DictConfig, space: dict[str, spaces.Dimension]) -> dict[str, spaces.Dimension]:
    """What the trials set: the space (warmup clipped to the run), or on a grid only its gridded dimensions."""
    space = spaces.bounded(space, cfg.train.max_steps)
    if cfg.sweep.sampler == "grid":
        return {key: dim for key, dim in space.items() if dim.grid}
    return space


def check_search_space(cfg: DictConfig, space: dict[str, spaces.Dimension]) -> None:
    spaces.check(space, set(valid_keys()))
    s = cfg.sweep
    if s.sampler == "grid":
        size = len(spaces.grid_points(space)) * s.grid_seeds
        if s.n_trials != size:
            raise UserError(f"sweep.sampler=grid needs sweep.n_trials = the grid's points x sweep.grid_seeds = {size}, got {s.n_trials}")


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """No trial is stopped before `sweep.prune_after_steps` (default: its first evaluation)."""
    first = min(cfg.sweep.prune_after_steps or cfg.train.eval_every or cfg.train.max_steps, cfg.train.max_steps)
    if cfg.sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=cfg.train.max_steps, reduction_factor=3)
    if cfg.sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.prune_after_trials, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


# ---- the queue of trials (the storage itself: research/study_storage.py) ----


def queue_plan(cfg: DictConfig, space: dict[str, spaces.Dimension], queued: int) -> list[tuple[dict, dict]]:
    """(fixed params, user attrs) of the searched trials to enqueue when `queued` already are.

    A new study: the default (the recipe's own values, the search's reference), then the search trials.
    A grid: every point at every seed. Raising sweep.n_trials later adds search trials; the confirm and
    evaluate trials are planned from the results (research/study_plan.py), not queued up front.
    """
    s = cfg.sweep
    if s.sampler == "grid":
        points = spaces.grid_points(space)
        plan_ = [(p, {STAGE_ATTR: "grid", SEED_ATTR: seed}) for seed in grid_seeds(cfg) for p in points]
        return plan_[queued:]
    plan_ = []
    if queued == 0 and s.enqueue_default:
        plan_.append((default_params(cfg, space), {STAGE_ATTR: "default", SEED_ATTR: cfg.seed}))
    plan_ += [({}, {STAGE_ATTR: "search", SEED_ATTR: cfg.seed})] * max(0, s.n_trials - queued - len(plan_))
    return plan_


def open_study(name: str, storage, pruner, cfg: DictConfig, space: dict[str, spaces.Dimension],
               planned: list[tuple[dict, dict]] | None = None) -> tuple[optuna.Study, bool]:
    """Create or load the study, and queue its trials: `queue_plan`'s, or the recipe's own list `planned` (those not queued yet);
    (study, created here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            study, created = optuna.create_study(study_name=name, storage=storage, pruner=pruner, direction="minimize"), True
        except DuplicatedStudyError:
            study, created = optuna.load_study(study_name=name, storage=storage, pruner=pruner), False
    if not created:  # the creator queues the first trials: wait for that, so workers started together queue them once
        deadline = time.monotonic() + 30
        while QUEUED_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.2)
    queued = study.user_attrs.get(QUEUED_ATTR, 0)
    searched = queue_plan(cfg, space, queued) if planned is None else planned[queued:]
    for params, attrs in searched:
        study.enqueue_trial(params, user_attrs=attrs)
    if searched or not created:
        study.set_user_attr(QUEUED_ATTR, queued + len(searched))
    return study, created


def take_queued_trial(study: optuna.Study, cfg: DictConfig, space: dict[str, spaces.Dimension], poll_s: float, console: Console) -> optuna.Trial | None:
    """The next queued trial, now RUNNING and ours; None once the study needs no more trials.

    Searched trials first; confirm and evaluate trials wait until no searched trial is left, and are
    planned (research/study_plan.py) by whichever worker finds the queue empty. While other workers
    still run trials, wait for them: a dead worker's trial is failed once its heartbeat is older than
    the grace period and queued again (`on_stale`), and this worker then takes it.
    """
    announced = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        open_trials = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
        searching = any(t.user_attrs.get(STAGE_ATTR) in SEARCHED for t in open_trials)
        for waiting in [t for t in open_trials if t.state == TrialState.WAITING and not (searching and t.user_attrs.get(STAGE_ATTR) not in SEARCHED)]:
            try:
                if not study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                    continue  # another worker took it first
            except UpdateFinishedTrialError:
                continue
            if (earlier := duplicate_of(waiting, trials)) is not None:  # two workers planned the same run at once
                study._storage.set_trial_user_attr(waiting._trial_id, END_REASON_ATTR, f"the same configuration and seed as trial {earlier.number}")
                study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.FAIL)
                continue
            study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + waiting.number, n_startup_trials=STARTUP_TRIALS)  # reproducible, distinct per worker
            return optuna.Trial(study, waiting._trial_id)
        if not open_trials:
            stage, needed = plan(trials, cfg, default_params(cfg, space))
            for params, attrs in needed:
                study.enqueue_trial(params, user_attrs=attrs)
            if needed:
                console.print(f"{stage}: {len(needed)} trial(s) queued")
                continue
            return None
        if not any(t.state == TrialState.WAITING for t in open_trials):
            if not announced:
                running = sum(t.state == TrialState.RUNNING for t in open_trials)
                console.print(f"no trial left to start; waiting for {running} running in other workers (a dead worker's is queued again after sweep.grace_s)")
                announced = True
        time.sleep(poll_s)


# ---- one trial ----


class ReportToTrial(Hooks):
    """Reports each validation loss to the study and stops a search trial when the pruner says so; counts the steps trained."""

    def __init__(self, trial: optuna.Trial, last_step: int, objective: str = "loss"):
        self.trial, self.last_step, self.steps, self.metric = trial, last_step, 0, f"val/{objective}"
        self.prunable = trial.user_attrs.get(STAGE_ATTR, "search") == "search"  # the default, grid and confirm trials run to the end

    def on_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.steps = max([self.steps, *(step for step, _ in rows)])

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics[self.metric], step)
        if self.prunable and step < self.last_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} {metrics[self.metric]:.4f})")


def trial_config(cfg: DictConfig, trial: optuna.Trial, space: dict[str, spaces.Dimension]) -> DictConfig:
    trial_cfg = copy.deepcopy(cfg)
    apply_overrides(trial_cfg, {**spaces.suggest(trial, space), "seed": trial.user_attrs.get(SEED_ATTR, cfg.seed)})
    trial_cfg.tracking.run_name = trial_run_name(cfg.tracking.run_name or cfg.exp, trial.number)
    trial_cfg.train.checkpoint_dir = ""  # trials keep no checkpoints: retrain the best one (see summary.md)
    validate(trial_cfg)
    return trial_cfg


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: DictConfig, space: dict[str, spaces.Dimension], client, parent_run_id: str | None,
              console: Console) -> None:
    """Train one trial, logged as a child run while Optuna's heartbeat thread marks it alive; tell the study how it ended."""
    state, value, reason, run_id, test_loss, bpb = TrialState.COMPLETE, None, "", None, math.nan, {}
    report = ReportToTrial(trial, cfg.train.max_steps, cfg.sweep.objective)
    try:
        trial_cfg = trial_config(cfg, trial, space)
        console.rule(f"trial {trial.number} ({trial.user_attrs.get(STAGE_ATTR, 'search')}, seed {trial_cfg.seed}): "
                     + "  ".join(f"{k}={v:.4g}" for k, v in trial.params.items()))
        hooks: list[Hooks] = [report]
        if client is not None:
            run_id = start_run(client, trial_cfg, parent_run_id, {names.SWEEP_STUDY_NAME: study.study_name, names.SWEEP_TRIAL_NUMBER: str(trial.number),
                                                                 names.SWEEP_STAGE: trial.user_attrs.get(STAGE_ATTR, "search")})
            trial.set_user_attr(CHILD_RUN_ATTR, run_id)
            hooks.insert(0, MLflowHook(client, run_id, log_artifacts=False))
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                result = train(trial_cfg, hooks)
                final = result.final_metrics  # the objective's: val/loss and test/loss, or val/bpb and test/bpb
                value, test_loss = final.get(f"val/{cfg.sweep.objective}", math.nan), final.get(f"test/{cfg.sweep.objective}", math.nan)
                bpb = {attr: final[metric] for attr, metric in zip(BPB_ATTRS, (names.VAL_BPB, names.TEST_BPB)) if math.isfinite(final.get(metric, math.nan))}
                del result  # and its model
            finally:
                if client is not None:
                    hooks[0].close()  # a pruned or failed run keeps the metrics logged up to its last step
        if not math.isfinite(value):
            state, value, reason = TrialState.FAIL, None, f"final val {cfg.sweep.objective} is {value}"
    except optuna.TrialPruned as pruned:
        state, reason = TrialState.PRUNED, str(pruned)
    except KeyboardInterrupt:
        finish_trial(study, trial, client, run_id, TrialState.FAIL, None, INTERRUPTED)
        raise
    except Exception as err:  # NaN loss, out of memory, a bad config: this trial fails, the study goes on
        state, value, reason = TrialState.FAIL, None, f"{type(err).__name__}: {err}"
    attrs = {STEPS_ATTR: report.steps, **bpb, **({TEST_LOSS_ATTR: test_loss} if math.isfinite(test_loss) else {})}  # the test loss: for the evaluation report only
    finish_trial(study, trial, client, run_id, state, value, reason, attrs)
    console.print(f"trial {trial.number}: [bold]{state.name}[/]" + (f" val {cfg.sweep.objective} {value:.4f}" if value is not None else "") + (f" ({reason})" if reason else ""))


def finish_trial(study: optuna.Study, trial: optuna.Trial, client, run_id: str | None, state: TrialState, value: float | None, reason: str,
                 attrs: dict | None = None) -> None:
    """Set the trial's last user attrs and tell the study, then end the child run once, with the same state. An interrupted trial is queued again."""
    try:
        for key, attr in {**(attrs or {}), END_REASON_ATTR: reason[:1000]}.items():
            trial.set_user_attr(key, attr)
        study.tell(trial, value, state=state)
    except UpdateFinishedTrialError:  # this worker was silent too long: another one failed the trial (and ended its run, on_stale)
        state, reason = TrialState.FAIL, WORKER_LOST
    else:
        if reason == INTERRUPTED:  # rerunning the command finishes the study
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(trial._trial_id))
    close_child_run(client, run_id, state, reason)


def stale_trial_callback(client, max_retries: int):
    """What the worker that fails a silent worker's trial does (Optuna calls it in that worker alone): end the trial's run, queue the trial again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        close_child_run(client, trial.user_attrs.get(CHILD_RUN_ATTR), TrialState.FAIL, WORKER_LOST)
        retry(study, trial)

    return on_stale


def close_child_run(client, run_id: str | None, state: TrialState, reason: str) -> None:
    """The child run's end mirrors the trial's: FINISHED (complete or pruned: the tag sweep.state tells), FAILED, or KILLED when
    interrupted. A run ended already (by the worker that failed its stale trial) or not in this store is left alone: it ends once."""
    if client is None or run_id is None:
        return
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    client.set_tag(run_id, names.SWEEP_STATE, state.name)
    if reason:
        client.set_tag(run_id, names.END_REASON, reason[:TAG_CHARS])
    client.set_terminated(run_id, status="KILLED" if reason == INTERRUPTED else TRIAL_RUN_STATUS[state.name])


# ---- the parent run ----


def parent_tags(cfg: DictConfig, name: str, url: str, pruner: optuna.pruners.BasePruner, space: dict[str, spaces.Dimension]) -> dict[str, str]:
    tags = {
        names.SWEEP_STUDY_NAME: name,
        names.SWEEP_STORAGE: parse(url).masked,
        "sweep.n_trials": str(cfg.sweep.n_trials),
        "sweep.sampler": f"TPESampler(seed={cfg.seed} + trial number)",
        "sweep.pruner": f"{type(pruner).__name__} ({cfg.sweep.pruner})",
        names.EXPERIMENT: cfg.exp,
    }
    tags.update({f"sweep.space.{key}": text for key, text in spaces.describe(space).items()})
    return tags


def open_parent_run(client, study: optuna.Study, created: bool, cfg: DictConfig, name: str, url: str, space: dict[str, spaces.Dimension]) -> str | None:
    """The study's one parent run (created by the worker that created the study, reopened by the others and by reruns)."""
    if client is None:
        return None
    run_id = existing_parent(client, study, created)
    tags = parent_tags(cfg, name, url, study.pruner, space)
    if run_id is None:
        run_id = start_run(client, cfg)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        params, machine_tags = params_and_tags(cfg, SWEEP_SECTIONS)  # the base config, the search space, pruner and n_trials
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        tags.update(machine_tags)
    else:
        client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, to_yaml(cfg), names.CONFIG_ARTIFACT)
    return run_id


def close_parent_run(client, run_id: str | None, study: optuna.Study, interrupted: bool, console: Console) -> None:
    """FINISHED once no trial is left to run, KILLED when this worker was stopped and no other is running; else it stays RUNNING."""
    if client is None or run_id is None:
        return
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        console.print("other workers are still running trials: the parent run stays RUNNING until the last one ends")
        return
    client.set_terminated(run_id, status="KILLED" if interrupted else "FINISHED")


def existing_parent(client, study: optuna.Study, created: bool) -> str | None:
    """The parent run of a resumed study, if this tracking store has it; None means: create one.

    Only the process that created the study creates the parent at once; the others wait for its
    run id to appear on the study, so workers started together share one parent.
    """
    if created:
        return None
    deadline = time.monotonic() + 10  # the creator names its parent right after queueing the trials
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None:
        return None
    try:
        active = client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # logged to another tracking store: start a parent in this one
        return None
    return run_id if active else None
