"""Optuna studies over any experiment: `run_sweep(cfg)`, what `run.py` does when `sweep.n_trials > 0`.

Each trial is the ordinary `train` loop with two more hooks: `MLflowHook` logs it as a child run
of the study's parent run, and `ReportToTrial` hands every validation loss to the pruner. The
study lives in an Optuna storage, so rerunning the same command resumes it and several workers
on one storage share it.

`sweep.n_trials` is the total, held as a queue: the worker that creates the study enqueues that
many trials (`study.enqueue_trial`), and every worker takes queued trials until none is left.
Taking one is the storage's own compare-and-set from WAITING to RUNNING (what `study.ask` does
with a queued trial), so any number of workers on SQLite, a journal file or PostgreSQL run
exactly `n_trials` trials without a lock. We do not use `study.optimize`: it asks for a trial
before it can know whether other workers have emptied the queue, and then creates a new one, so
two workers finishing at the same moment ran one trial too many. Everything else is Optuna's:
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
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from research import distributed, names, registry
from research.config import apply_overrides, resolve_path, to_yaml, validate
from research.database import open_store
from research.errors import UserError
from research.run_naming import start_run, trial_run_name
from research.run_params import SWEEP_SECTIONS, TAG_CHARS, params_and_tags
from research.store_url import parse, sqlite_url
from research.tracking import MLflowHook
from research.tracking_store import connect, tracking_uri
from research.sweep_report import CONFIRM_RANK_ATTR, SEED_ATTR, STAGE_ATTR, STEPS_ATTR, candidates, summarise
from research.trainer import Hooks, train

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run
QUEUED_ATTR = "n_trials_queued"  # study user attr: how many search (or grid) trials have been enqueued in all
STARTUP_TRIALS = 5  # TPE samples at random until this many trials finished, then models the good ones
CHILD_RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow child run
END_REASON_ATTR = names.END_REASON  # trial user attr: why a trial was pruned or failed
HEARTBEAT_ATTR = "heartbeat"  # trial system attr on journal storages: last sign of life (unix time)
WORKER_LOST = "its worker stopped (no heartbeat)"
INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: the trial counts as failed, its run ends KILLED like any stopped run
TRIAL_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}  # a trial's run ends as its state says (sweep.state tells a pruned one)


def run_sweep(cfg: DictConfig) -> optuna.Study:
    """Run queued trials until none is left, then summarise the study."""
    refuse_torchrun()
    check_search_space(cfg)
    console = Console()
    name = cfg.sweep.study_name or f"{cfg.exp}-sweep"
    url = storage_url(cfg)
    client = connect(tracking_uri(cfg)) if cfg.tracking.enabled else None
    storage = open_storage(url, cfg.sweep, stale_trial_callback(client, cfg.sweep.max_retries))  # before MLflow: a bad storage URL fails at once
    study, created = open_study(name, storage, make_pruner(cfg), cfg)
    console.print(f"[bold]study[/] {name} ({'new' if created else 'resumed'}, {cfg.sweep.n_trials} trials) in {parse(url).masked}")
    parent_run_id = open_parent_run(client, study, created, cfg, name, url)
    interrupted = True
    try:
        while (trial := take_queued_trial(study, cfg.seed, min(cfg.sweep.heartbeat_s, 5), console, cfg.sweep.confirm_top_k)) is not None:
            run_trial(study, trial, cfg, client, parent_run_id, console)
            gc.collect()  # the trial's model is unreachable now; free it before the next one is built
        summarise(study, cfg, registry.build(cfg.exp), describe_space(cfg), parse(url).shown(), client, parent_run_id, console)
        interrupted = False
    finally:
        close_parent_run(client, parent_run_id, study, interrupted, console)
    return study


def refuse_torchrun() -> None:
    """A trial is one process's training run: under torchrun each rank would take a trial of its own while DDP trains one model."""
    if (ranks := distributed.launched_world_size()) > 1:
        raise UserError(f"a sweep cannot run under torchrun ({ranks} ranks): each rank would take its own trial while they all train one model; "
                        "start the same command as several single-process workers instead (one per GPU, e.g. CUDA_VISIBLE_DEVICES=0 python run.py ..., "
                        "all on one sweep.storage), or retrain one configuration under torchrun with sweep.n_trials=0")


# ---- search space ----


def search_space(trial: optuna.Trial, cfg: DictConfig) -> dict[str, float | int]:
    """The trial's config overrides: peak lr (log-uniform), warmup steps and the floor of the cosine decay.

    Warmup is in steps, and trials train at the recipe's own length, so the best trial's values are the
    ones to use at that length; at a longer one keep the warmup steps (the README's rule). A grid keeps
    the recipe's warmup and searches lr x min-lr ratio.
    """
    s = cfg.sweep
    if s.sampler == "grid":
        return {"train.lr": trial.suggest_float("train.lr", min(s.grid_lr), max(s.grid_lr), log=True),
                "train.min_lr_ratio": trial.suggest_float("train.min_lr_ratio", min(s.grid_min_lr_ratio), max(s.grid_min_lr_ratio))}
    return {
        "train.lr": trial.suggest_float("train.lr", s.lr_min, s.lr_max, log=True),
        "train.warmup_steps": trial.suggest_int("train.warmup_steps", s.warmup_min, min(s.warmup_max, cfg.train.max_steps)),
        "train.min_lr_ratio": trial.suggest_float("train.min_lr_ratio", s.min_lr_ratio_min, s.min_lr_ratio_max),
    }


def describe_space(cfg: DictConfig) -> dict[str, str]:
    s = cfg.sweep
    if s.sampler == "grid":
        return {"train.lr": f"grid {list(s.grid_lr)}", "train.min_lr_ratio": f"grid {list(s.grid_min_lr_ratio)}"}
    return {
        "train.lr": f"log-uniform [{s.lr_min:g}, {s.lr_max:g}]",
        "train.warmup_steps": f"int [{s.warmup_min}, {min(s.warmup_max, cfg.train.max_steps)}]",
        "train.min_lr_ratio": f"uniform [{s.min_lr_ratio_min:g}, {s.min_lr_ratio_max:g}]",
    }


def check_search_space(cfg: DictConfig) -> None:
    s = cfg.sweep
    grid_size = len(s.grid_lr) * len(s.grid_min_lr_ratio) * s.grid_seeds
    checks = [
        (0 < s.lr_min <= s.lr_max, f"need 0 < sweep.lr_min <= sweep.lr_max, got {s.lr_min} and {s.lr_max}"),
        (0 <= s.warmup_min <= min(s.warmup_max, cfg.train.max_steps),
         f"need 0 <= sweep.warmup_min <= sweep.warmup_max and train.max_steps, got {s.warmup_min}, {s.warmup_max}, {cfg.train.max_steps}"),
        (0 <= s.min_lr_ratio_min <= s.min_lr_ratio_max <= 1,
         f"need 0 <= sweep.min_lr_ratio_min <= sweep.min_lr_ratio_max <= 1, got {s.min_lr_ratio_min} and {s.min_lr_ratio_max}"),
        (s.prune_after_steps >= 0 and s.prune_after_trials >= 0, "sweep.prune_after_steps and sweep.prune_after_trials must be >= 0"),
        (s.sampler in ("tpe", "grid"), f"sweep.sampler must be tpe or grid, got '{s.sampler}'"),
        (s.confirm_top_k >= 0 and s.confirm_seeds >= 0, "sweep.confirm_top_k and sweep.confirm_seeds must be >= 0"),
        (s.sampler != "grid" or (grid_size > 0 and s.n_trials == grid_size and min(s.grid_lr) > 0),
         f"sweep.sampler=grid needs positive sweep.grid_lr, sweep.grid_min_lr_ratio and sweep.n_trials = their product x sweep.grid_seeds = {grid_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """No trial is stopped before `sweep.prune_after_steps` (default: its first evaluation)."""
    first = min(cfg.sweep.prune_after_steps or cfg.train.eval_every or cfg.train.max_steps, cfg.train.max_steps)
    if cfg.sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=cfg.train.max_steps, reduction_factor=3)
    if cfg.sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.prune_after_trials, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


# ---- storage: where the study lives, and its queue of trials ----


def storage_url(cfg: DictConfig) -> str:
    return cfg.sweep.storage or sqlite_url(resolve_path(cfg.out_dir) / "optuna.db")


def open_storage(url: str, sweep_cfg, on_stale) -> RDBStorage | JournalStorage:
    """A journal file, or any SQLAlchemy URL (SQLite, PostgreSQL, MySQL), with heartbeats so dead workers' trials get failed."""
    heartbeat = {"heartbeat_interval": sweep_cfg.heartbeat_s, "grace_period": sweep_cfg.grace_s, "heartbeat_stale_trial_callback": on_stale}

    def storage() -> RDBStorage | JournalStorage:
        if (store := parse(url)).kind == "journal":  # a journal file that processes on one machine share
            store.path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorageWithHeartbeat(JournalFileBackend(str(store.path)), **heartbeat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(url, **heartbeat)

    return open_store(url, storage, "Optuna storage", "fix sweep.storage (is the server up, the database created, the driver installed?)")


class JournalStorageWithHeartbeat(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its SQL storage has: the last sign of life is a trial system attr."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, heartbeat_stale_trial_callback):
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period, self.on_stale = heartbeat_interval, grace_period, heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if now - t.system_attrs.get(HEARTBEAT_ATTR, t.datetime_start.timestamp()) > self.grace_period]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.on_stale


def queue_plan(cfg: DictConfig, queued: int) -> list[tuple[dict, dict]]:
    """(fixed params, user attrs) of the trials to enqueue when `queued` search trials already are.

    A new study: the default (the recipe's own values, the report's reference), the search trials,
    and the confirm trials that retrain the best candidates at extra seeds once the search is done.
    A grid: every point at every seed. Raising sweep.n_trials later adds search trials only.
    """
    s, t = cfg.sweep, cfg.train
    if s.sampler == "grid":
        points = [{"train.lr": lr, "train.min_lr_ratio": ratio} for lr in s.grid_lr for ratio in s.grid_min_lr_ratio]
        plan = [(p, {STAGE_ATTR: "grid", SEED_ATTR: cfg.seed + i}) for i in range(s.grid_seeds) for p in points]
        return plan[queued:]
    plan = []
    if queued == 0 and s.enqueue_default:
        plan.append(({"train.lr": t.lr, "train.warmup_steps": t.warmup_steps, "train.min_lr_ratio": t.min_lr_ratio}, {STAGE_ATTR: "default", SEED_ATTR: cfg.seed}))
    plan += [({}, {STAGE_ATTR: "search", SEED_ATTR: cfg.seed})] * (s.n_trials - queued - len(plan))
    if queued == 0 and s.confirm_seeds > 0:
        ranks = range(int(s.enqueue_default) + s.confirm_top_k)
        plan += [({}, {STAGE_ATTR: "confirm", CONFIRM_RANK_ATTR: r, SEED_ATTR: cfg.seed + 1 + i}) for i in range(s.confirm_seeds) for r in ranks]
    return plan


def open_study(name: str, storage, pruner, cfg: DictConfig) -> tuple[optuna.Study, bool]:
    """Create or load the study, and queue its trials (`queue_plan`); (study, created here)."""
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
    plan = queue_plan(cfg, queued)
    for params, attrs in plan:
        study.enqueue_trial(params, user_attrs=attrs)
    searched = sum(attrs[STAGE_ATTR] != "confirm" for _, attrs in plan)
    if searched or not created:
        study.set_user_attr(QUEUED_ATTR, queued + searched)
    return study, created


def take_queued_trial(study: optuna.Study, seed: int, poll_s: float, console: Console, top_k: int = 0) -> optuna.Trial | None:
    """The next queued trial, now RUNNING and ours; None once no trial is queued or running anywhere.

    While other workers still run trials, wait for them: a dead worker's trial is failed once its heartbeat
    is older than the grace period and queued again (`on_stale`), and this worker then takes it.
    """
    announced = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        searching = any(t.user_attrs.get(STAGE_ATTR) != "confirm" for t in trials)  # confirm trials wait for the whole search
        for waiting in [t for t in trials if t.state == TrialState.WAITING and not (searching and t.user_attrs.get(STAGE_ATTR) == "confirm")]:
            try:
                if not study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                    continue  # another worker took it first
            except UpdateFinishedTrialError:
                continue
            if waiting.user_attrs.get(STAGE_ATTR) == "confirm" and not assign_candidate(study, waiting, top_k):
                continue
            study.sampler = optuna.samplers.TPESampler(seed=seed + waiting.number, n_startup_trials=STARTUP_TRIALS)  # reproducible, distinct per worker
            return optuna.Trial(study, waiting._trial_id)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return None
        if not announced:
            console.print(f"no trial left to start; waiting for {len(running)} running in other workers (a dead worker's is queued again after sweep.grace_s)")
            announced = True
        time.sleep(poll_s)


def assign_candidate(study: optuna.Study, trial: FrozenTrial, top_k: int) -> bool:
    """A confirm trial retrains the candidate of its rank (the search is over, so the ranking is final): its params become fixed.

    With fewer completed configurations than ranks, the trial has nothing to retrain: it fails with that reason (False).
    """
    ranked = candidates(study.get_trials(deepcopy=False), top_k)
    rank = trial.user_attrs[CONFIRM_RANK_ATTR]
    if rank < len(ranked):
        study._storage.set_trial_system_attr(trial._trial_id, "fixed_params", ranked[rank])
        return True
    study._storage.set_trial_user_attr(trial._trial_id, END_REASON_ATTR, f"no configuration of rank {rank} to confirm: too few search trials completed")
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    return False


# ---- one trial ----


class ReportToTrial(Hooks):
    """Reports each validation loss to the study and stops a search trial when the pruner says so; counts the steps trained."""

    def __init__(self, trial: optuna.Trial, last_step: int):
        self.trial, self.last_step, self.steps = trial, last_step, 0
        self.prunable = trial.user_attrs.get(STAGE_ATTR, "search") == "search"  # the default, grid and confirm trials run to the end

    def on_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.steps = max([self.steps, *(step for step, _ in rows)])

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics[names.VAL_LOSS], step)
        if self.prunable and step < self.last_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {metrics[names.VAL_LOSS]:.4f})")


def trial_config(cfg: DictConfig, trial: optuna.Trial) -> DictConfig:
    trial_cfg = copy.deepcopy(cfg)
    apply_overrides(trial_cfg, {**search_space(trial, cfg), "seed": trial.user_attrs.get(SEED_ATTR, cfg.seed)})
    trial_cfg.tracking.run_name = trial_run_name(cfg.tracking.run_name or cfg.exp, trial.number)
    trial_cfg.train.checkpoint_dir = ""  # trials keep no checkpoints: retrain the best one (see summary.md)
    validate(trial_cfg)
    return trial_cfg


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: DictConfig, client, parent_run_id: str | None, console: Console) -> None:
    """Train one trial, logged as a child run while Optuna's heartbeat thread marks it alive; tell the study how it ended."""
    state, value, reason, run_id = TrialState.COMPLETE, None, "", None
    report = ReportToTrial(trial, cfg.train.max_steps)
    try:
        trial_cfg = trial_config(cfg, trial)
        console.rule(f"trial {trial.number} ({trial.user_attrs.get(STAGE_ATTR, 'search')}, seed {trial_cfg.seed}): "
                     + "  ".join(f"{k}={v:.4g}" for k, v in trial.params.items()))
        hooks: list[Hooks] = [report]
        if client is not None:
            run_id = start_run(client, trial_cfg, parent_run_id, {names.SWEEP_STUDY_NAME: study.study_name, names.SWEEP_TRIAL_NUMBER: str(trial.number)})
            trial.set_user_attr(CHILD_RUN_ATTR, run_id)
            hooks.insert(0, MLflowHook(client, run_id, log_artifacts=False))
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                value = train(trial_cfg, hooks).final_val_loss  # the result (and its model) is dropped here
            finally:
                if client is not None:
                    hooks[0].close()  # a pruned or failed run keeps the metrics logged up to its last step
        if not math.isfinite(value):
            state, value, reason = TrialState.FAIL, None, f"final val loss is {value}"
    except optuna.TrialPruned as pruned:
        state, reason = TrialState.PRUNED, str(pruned)
    except KeyboardInterrupt:
        finish_trial(study, trial, client, run_id, TrialState.FAIL, None, INTERRUPTED)
        raise
    except Exception as err:  # NaN loss, out of memory, a bad config: this trial fails, the study goes on
        state, value, reason = TrialState.FAIL, None, f"{type(err).__name__}: {err}"
    finish_trial(study, trial, client, run_id, state, value, reason, {STEPS_ATTR: report.steps})
    console.print(f"trial {trial.number}: [bold]{state.name}[/]" + (f" val loss {value:.4f}" if value is not None else "") + (f" ({reason})" if reason else ""))


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


def parent_tags(cfg: DictConfig, name: str, url: str, pruner: optuna.pruners.BasePruner) -> dict[str, str]:
    tags = {
        names.SWEEP_STUDY_NAME: name,
        names.SWEEP_STORAGE: parse(url).masked,
        "sweep.n_trials": str(cfg.sweep.n_trials),
        "sweep.sampler": f"TPESampler(seed={cfg.seed} + trial number)",
        "sweep.pruner": f"{type(pruner).__name__} ({cfg.sweep.pruner})",
        names.EXPERIMENT: cfg.exp,
    }
    tags.update({f"sweep.space.{key}": text for key, text in describe_space(cfg).items()})
    return tags


def open_parent_run(client, study: optuna.Study, created: bool, cfg: DictConfig, name: str, url: str) -> str | None:
    """The study's one parent run (created by the worker that created the study, reopened by the others and by reruns)."""
    if client is None:
        return None
    run_id = existing_parent(client, study, created)
    tags = parent_tags(cfg, name, url, study.pruner)
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
