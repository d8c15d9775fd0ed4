"""Continue a logged run where it stopped, or run it again from what it logged.

    python run.py resume=<run_id>      # the same MLflow run, from its newest checkpoint: `resume`
    python run.py reproduce=<run_id>   # a new run from the logged config, compared with the original: `reproduce`

Both start from what the run logged rather than from today's defaults: its config.yaml
artifact (the whole resolved config, seed included) and its `data.digest` and
`git.commit` tags. A checkpoint holds everything the next step depends on, so on the
same machine and thread count a resumed run ends with the very weights and per-step
losses of an uninterrupted one, and a reproduction repeats the original's curve.
Overrides that would change the numbers are refused.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research import distributed
from research.checkpoint import checkpoint_path, checkpoint_step, list_checkpoints
from research.config import apply_overrides, from_yaml, make_config, resolve_path, validate
from research.corpus import describe
from research.errors import UserError
from research.mixture import config_data_digest
from research.runner import report, run_tracked
from research.names import (
    CHECKPOINT_ARTIFACT, CHECKPOINT_ARTIFACT_STEP, CONFIG_ARTIFACT, DATA_DIGEST, FINAL_VAL_LOSS, GIT_COMMIT, GIT_DIRTY, REPRODUCED_FROM,
    RESUMED_FROM_STEP, TOKENS_PER_STEP, TRAIN_LOSS, WORLD_SIZE,
)
from research.provenance import git_info
from research.run_params import MACHINE_KEYS
from research.store_url import parse
from research.tracking_store import connect, last_logged_steps, tracking_uri
from research.trainer import TrainResult

# The overrides a resume or a reproduction accepts. Machine keys (research/run_params.py) and bookkeeping
# keys say where the store, outputs and caches are and how often to log and save: they cannot change a
# number. Hardware keys can change the low-order bits (another summation order), so they warn.
BOOKKEEPING_KEYS = ("train.checkpoint_every", "train.keep_checkpoints", "train.log_every")
HARDWARE_KEYS = ("train.threads", "train.device")
ALLOW_DATA_CHANGE = "allow_data_change"  # the option of `run.py reproduce=<run_id>` that reruns on changed data


def resume(run_id: str, overrides: dict[str, str] | None = None) -> int:
    """Continue `run_id` inside the same MLflow run from its newest checkpoint; it ends FINISHED.

    A run that already finished is left as it is (one line, exit status 0). A run
    with no checkpoint anywhere trains again from step 0, in the same run.
    """
    allowed = check_overrides("resume", overrides or {})
    client, run, cfg = open_logged_run(run_id, allowed)
    if run.info.status == "FINISHED":
        print(f"run {run_id} already finished; nothing to resume")
        return 0
    check_data(run, cfg, "resume", allow_change=False)
    warn_about_differences(run, allowed)
    keep_tokens_per_step(client, run, cfg)
    folder = resolve_path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else None
    if folder is None or not folder.is_dir():  # another machine: its own results folder
        folder = resolve_path(cfg.out_dir) / "checkpoints" / run_id
    cfg.train.checkpoint_dir = str(folder)
    start = resume_point(client, run, folder)
    cfg.train.resume_from = str(start) if start else ""
    step = checkpoint_step(start) if start else 0
    where = f"its checkpoint {start}" if start else "step 0 (no checkpoint was found locally or in its artifacts)"
    print(f"resuming run {run_id} from {where}", flush=True)
    client.set_tag(run_id, RESUMED_FROM_STEP, str(step))
    report(cfg, run_tracked(cfg, run_id=run_id))
    return 0


def reproduce(run_id: str, overrides: dict[str, str] | None = None, allow_data_change: bool = False) -> int:
    """Train `run_id`'s logged config again as a new run tagged `reproduced_from`, and compare the two.

    allow_data_change: rerun on data whose digest differs from the logged one (the curves will differ).
    """
    allowed = check_overrides("reproduce", overrides or {})
    client, run, cfg = open_logged_run(run_id, allowed)
    check_data(run, cfg, "reproduce", allow_change=allow_data_change)
    warn_about_differences(run, allowed)
    cfg.train.checkpoint_dir, cfg.train.resume_from = "", ""  # the new run's own
    cfg.tracking.run_name = f"reproduce-{run_id[:8]}"
    cfg.tracking.enabled = True
    cfg.tracking.experiment = client.get_experiment(run.info.experiment_id).name
    result = run_tracked(cfg, tags={REPRODUCED_FROM: run_id})
    report(cfg, result)
    compare_with_original(client, run, result)
    return 0


def check_overrides(verb: str, overrides: dict[str, str]) -> dict[str, str]:
    """The overrides, if every key is one a resume or reproduction accepts; any other key is refused in one line."""
    accepted = tuple(key for key in MACHINE_KEYS + BOOKKEEPING_KEYS + HARDWARE_KEYS if key != "train.resume_from")
    for key in overrides:
        if key == "train.resume_from":  # the starting point is the run's own newest checkpoint, or step 0 for a reproduction
            raise UserError(f"{verb}=<run_id> chooses its own checkpoint, so it refuses 'train.resume_from'; to start from a given checkpoint file, "
                            "start a new run: python run.py exp=NAME train.resume_from=PATH")
        if key not in accepted:
            why = ("to train longer, start a new run with a larger train.max_steps (the learning-rate schedule depends on it)"
                   if key == "train.max_steps" else "for a variant, start a new run: python run.py exp=NAME key=value")
            raise UserError(f"{verb}=<run_id> refuses '{key}': the run would silently differ from the logged one; {why} (accepted: {', '.join(accepted)})")
    return dict(overrides)


def open_logged_run(run_id: str, overrides: dict[str, str]) -> tuple[MlflowClient, Run, DictConfig]:
    """The run and its logged config (with the allowed overrides), from the store the overrides point at."""
    uri = tracking_uri(make_config(overrides))
    store = parse(uri)
    if store.kind == "sqlite" and not store.path.exists():
        raise UserError(f"no MLflow store at {store.masked}; point out_dir, tracking.uri or MLFLOW_TRACKING_URI at the store that holds run {run_id}")
    client = connect(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run '{run_id}' in the MLflow store {store.masked}; check the id (python run.py ui), or point out_dir, tracking.uri or MLFLOW_TRACKING_URI at the store that holds it") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"run {run_id} is deleted in {store.masked}; restore it in the MLflow UI first")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
        except (MlflowException, OSError):
            raise UserError(f"run {run_id} has no config.yaml artifact (a sweep's parent, or a run not logged by this trainer); pick a training run") from None
    cfg = from_yaml(text)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return client, run, cfg


def check_data(run: Run, cfg: DictConfig, verb: str, allow_change: bool) -> None:
    """Refuse to continue or repeat a run on data other than its own (a reproduction may opt in)."""
    logged, current = run.data.tags.get(DATA_DIGEST), config_data_digest(cfg.data)
    if not logged or logged == current:
        return
    what = "data.sources (a source's data, name or weight)" if cfg.data.sources else describe(cfg.data.path)
    changed = f"the data {what} changed since run {run.info.run_id} (digest {current}, logged {logged})"
    if allow_change:
        warn(f"{changed}; reproducing on the new data, so the curves will differ")
    elif verb == "reproduce":
        raise UserError(f"{changed}; restore the original file, or add {ALLOW_DATA_CHANGE}=true to rerun on the new data")
    else:
        raise UserError(f"{changed}; restore the original file to resume it (or start a new run on the new data)")


def warn_about_differences(run: Run, overrides: dict[str, str]) -> None:
    """Say what may make the numbers differ: other code than the run's, or other hardware settings."""
    logged, current = run.data.tags.get(GIT_COMMIT), git_info()["commit"]
    if logged and logged != current:
        warn(f"the code is at commit {current[:12]} but run {run.info.run_id} used {logged[:12]}; results may differ")
    if run.data.tags.get(GIT_DIRTY) == "true":  # changes to tracked files, always logged as the patch (untracked files are only listed, in git.untracked)
        warn(f"run {run.info.run_id} had uncommitted changes to tracked files (its git_diff.patch artifact); results may differ unless the same changes are present")
    for key in HARDWARE_KEYS:
        if key in overrides:
            warn(f"{key}={overrides[key]} may change the low-order bits of every step compared with the logged run")


def keep_tokens_per_step(client: MlflowClient, run: Run, cfg: DictConfig) -> None:
    """On another number of ranks, scale train.grad_accum so that each step takes the run's logged tokens per step; refuse when no
    whole number does. The sampler's position counts sequences of the whole step, so the same sequences follow (an epoch's
    incomplete tail is cut per micro-batch, so after an epoch boundary the order can shift by a few sequences)."""
    ranks = distributed.launched_world_size()
    per_accum = cfg.train.batch_size * cfg.data.seq_len * ranks
    logged = run.data.params.get(TOKENS_PER_STEP)
    if logged is None:
        warn(f"run {run.info.run_id} logged no {TOKENS_PER_STEP}; resuming on {ranks} rank(s) with train.grad_accum={cfg.train.grad_accum} "
             f"({per_accum * cfg.train.grad_accum:,} tokens per step), as if it had trained on as many")
        return
    logged, was = int(logged), run.data.tags.get(WORLD_SIZE, "?")
    if logged == per_accum * cfg.train.grad_accum:
        return
    if logged % per_accum:
        raise UserError(f"run {run.info.run_id} took {logged:,} tokens per step on {was} rank(s), which no train.grad_accum gives on {ranks} "
                        f"(train.batch_size x data.seq_len x ranks = {per_accum:,}); resume it on {was} rank(s)")
    before, cfg.train.grad_accum = cfg.train.grad_accum, logged // per_accum
    if distributed.launched_rank() == 0:
        print(f"run {run.info.run_id} trained on {was} rank(s); on {ranks} it keeps its {logged:,} tokens per step with "
              f"train.grad_accum={cfg.train.grad_accum} (was {before})", flush=True)
        client.set_tag(run.info.run_id, "resume.train.grad_accum", str(cfg.train.grad_accum))


def resume_point(client: MlflowClient, run: Run, folder: Path) -> Path | None:
    """The newest checkpoint not past the run's last logged train/loss step: a local file, else the logged artifact.

    Metrics are flushed before a checkpoint is recorded, so a kill between writing a
    checkpoint and logging its metrics leaves an older, complete checkpoint to use.
    """
    logged = last_logged_steps(client, run.info.run_id).get(TRAIN_LOSS, 0)
    local = list_checkpoints(folder)
    usable = [path for path in local if checkpoint_step(path) <= logged]
    if usable:
        return usable[-1]
    if local:
        warn(f"{local[-1]} is newer than the last logged step {logged}; steps {logged + 1}..{checkpoint_step(local[-1])} will have no train metrics")
        return local[-1]
    artifact_step = run.data.tags.get(CHECKPOINT_ARTIFACT_STEP)
    if not artifact_step:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            downloaded = client.download_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT, tmp)
        except (MlflowException, OSError) as err:
            raise UserError(f"run {run.info.run_id} has no local checkpoint in {folder} and its {CHECKPOINT_ARTIFACT} artifact cannot be fetched ({type(err).__name__})") from None
        target = checkpoint_path(folder, int(artifact_step))
        os.replace(downloaded, target)
    print(f"fetched the step-{artifact_step} checkpoint from the run's artifacts into {folder}", flush=True)
    return target


def compare_with_original(client: MlflowClient, original: Run, result: TrainResult) -> dict:
    """Per-step train/loss and final val loss of the reproduction against the original: printed and logged on the new run."""
    def curve(run_id: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, TRAIN_LOSS)}

    before, after = curve(original.info.run_id), curve(result.run_id)
    common = sorted(before.keys() & after.keys())
    max_diff = max((abs(before[s] - after[s]) for s in common), default=math.nan)
    original_val = original.data.metrics.get(FINAL_VAL_LOSS, math.nan)
    identical = bool(common) and before == after and original_val == result.final_val_loss
    now_ms = int(time.time() * 1000)
    metrics = {"reproduce/max_abs_train_loss_diff": max_diff, "reproduce/original_final_val_loss": original_val,
               "reproduce/final_val_loss_diff": result.final_val_loss - original_val}
    tags = {"reproduce.identical": str(identical).lower(), "reproduce.compared_steps": f"{len(common)} of {len(before)}"}
    client.log_batch(result.run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()], tags=[RunTag(k, v) for k, v in tags.items()])
    verdict = "identical" if identical else "DIFFERENT"
    print(f"reproduction of {original.info.run_id}: {verdict}; {len(common)} of {len(before)} steps compared, max |train/loss diff| = {max_diff:.3g}; "
          f"final val loss {result.final_val_loss:.6f} (original {original_val:.6f})")
    return {**metrics, "identical": identical}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
