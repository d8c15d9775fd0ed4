"""Upload runs that lost their tracking server, once a server answers again (`python run.py sync`).

A run whose server went away keeps going and leaves `<out_dir>/offline/<run_id>.jsonl` and, beside
it, `<run_id>/` with the artifacts it could not upload (the format: research/offline.py). Sync puts
them into the same run when the server still has it, else into a new run tagged `sync.original_run_id`.

Every step compares with what the server holds (params by key, metric points by key and step,
tags by value, artifact files by path and size), so a sync killed halfway, or run twice, uploads
nothing twice and loses nothing. A run with its end status uploaded moves to `offline/synced/`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from research import names, offline
from research.offline import OfflineRun
from research.run_naming import unique_run_name
from research.tracking_store import METRIC_BATCH, PARAM_BATCH, experiment_id, recipe_description

NOT_COPIED_TAGS = (names.RUN_NAME, names.PARENT_RUN)  # the new run's own name; a parent on the lost server


def sync_offline(folder: Path, client: MlflowClient, artifact_location: str | None) -> int:
    """Upload every run file in `folder` to the client's store; the number of runs that had something to upload."""
    paths = offline.run_files(folder)
    changed = 0
    for path in paths:
        changed += sync_run(client, offline.read(path), artifact_location)
    if not changed:
        print(f"nothing left to sync in {folder}" + (f" ({len(paths)} run(s) still without an end status)" if paths else ""))
    return changed


def sync_run(client: MlflowClient, run: OfflineRun, artifact_location: str | None) -> bool:
    """Upload what the server lacks of one run, end status last; True when anything was uploaded."""
    target, how = target_run(client, run, artifact_location)
    if target is None:
        print(f"run {run.run_id}: the server has no such run and its file has no header to recreate it from; kept {run.path}")
        return False
    on_server = client.get_run(target)
    params = {k: v for k, v in run.header.get("params", {}).items() if k not in on_server.data.params}
    tags = {k: v for k, v in {**run.tags, **({names.END_REASON: run.end_reason} if run.end_reason else {})}.items() if on_server.data.tags.get(k) != v}
    metrics = missing_metrics(client, target, run.metrics)
    for i in range(0, len(params), PARAM_BATCH):
        client.log_batch(target, params=[Param(k, str(v)) for k, v in list(params.items())[i : i + PARAM_BATCH]])
    for i in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(target, metrics=metrics[i : i + METRIC_BATCH])
    if tags:
        client.log_batch(target, tags=[RunTag(k, v) for k, v in tags.items()])
    files = upload_artifacts(client, target, offline.artifacts_folder(run.path))
    ended = run.status is not None and on_server.info.status != run.status
    if ended:
        end_ms = max((m.timestamp for m in run.metrics), default=int(time.time() * 1000))
        client.set_terminated(target, status=run.status, end_time=end_ms)
    uploaded = bool(params or metrics or tags or files or ended or how == "new run")
    if uploaded:
        keys = len({m.key for m in metrics})
        print(f"run {run.run_id} -> {how} {target}: {len(params)} params, {len(metrics)} metric points of {keys} metrics, {len(tags)} tags, "
              f"{files} artifact files" + (f", status {run.status}" if ended else ""))
    if run.status is None:
        print(f"run {run.run_id}: no end status yet (still running, or its process died); kept {run.path} for a later sync")
    else:
        archive(run.path)
    return uploaded


def target_run(client: MlflowClient, run: OfflineRun, artifact_location: str | None) -> tuple[str | None, str]:
    """(run id to upload into, how it was found): the same run, a copy made by an earlier sync, or a new run."""
    try:
        if client.get_run(run.run_id).info.lifecycle_stage != "deleted":
            return run.run_id, "same run"
    except MlflowException:
        pass
    if not run.header:
        return None, ""
    header_tags = run.header.get("tags", {})
    exp_id = experiment_id(client, run.header["experiment"], artifact_location, recipe_description(header_tags.get(names.EXPERIMENT, "")))
    earlier = client.search_runs([exp_id], filter_string=f"tags.`{names.SYNC_ORIGINAL_RUN_ID}` = '{run.run_id}'", max_results=1)
    if earlier:
        return earlier[0].info.run_id, "earlier copy"
    tags = {k: v for k, v in header_tags.items() if k not in NOT_COPIED_TAGS}
    tags[names.SYNC_ORIGINAL_RUN_ID] = run.run_id
    name = unique_run_name(client, exp_id, run.header.get("run_name") or run.header["experiment"])
    created = client.create_run(exp_id, start_time=run.header.get("start_time"), run_name=name, tags=tags)
    return created.info.run_id, "new run"


def missing_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> list[Metric]:
    """The points whose (key, step) the run does not hold yet (our runs log each step of a metric once)."""
    held = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {m.key for m in metrics}}
    return [m for m in metrics if m.step not in held[m.key]]


def upload_artifacts(client: MlflowClient, run_id: str, folder: Path) -> int:
    """Upload the files under `folder` that the run lacks (by path and size); how many were uploaded."""
    if not folder.is_dir():
        return 0
    held = remote_files(client, run_id)
    count = 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if held.get(relative) != file.stat().st_size:
            parent = str(Path(relative).parent)
            client.log_artifact(run_id, str(file), None if parent == "." else parent)
            count += 1
    return count


def remote_files(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    """{artifact path: size} of every file the run holds."""
    files: dict[str, int] = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            files.update(remote_files(client, run_id, info.path))
        else:
            files[info.path] = info.file_size
    return files


def archive(path: Path) -> None:
    """Move a fully uploaded run file (and its artifacts folder) to offline/synced/, out of the next sync's way."""
    done = path.parent / "synced"
    done.mkdir(exist_ok=True)
    artifacts = offline.artifacts_folder(path)
    if artifacts.is_dir():
        shutil.rmtree(done / artifacts.name, ignore_errors=True)
        artifacts.rename(done / artifacts.name)
    path.rename(done / path.name)
