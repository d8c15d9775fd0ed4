"""The MLflow side of a training run: `mlflow_run` opens and ends it, `MLflowHook` logs into it.

Which store and experiment (research/tracking_store.py), the run's name (run_naming.py), its
params and tags (run_params.py, provenance.py), its files (artifacts.py) and what it leaves when
the tracking server goes away (offline.py) each have their own module; this one drives them.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research import distributed, names, offline
from research.artifacts import log_file_as, write_outputs
from research.config import to_yaml
from research.errors import UserError
from research.provenance import run_tags
from research.run_naming import start_run
from research.run_params import TAG_CHARS, TRAIN_SECTIONS, params_and_tags, training_facts
from research.tracking_store import METRIC_BATCH, PARAM_BATCH, connect, last_logged_steps, server_gone, tracking_uri
from research.trainer import Hooks, RunInfo, TrainResult

OFFLINE_RETRY_S = 30  # while a tracking server is gone, try it again this often (each try costs seconds of HTTP retries)
OFFLINE_SPILL = 100_000  # metric values held in memory while offline; more go to the fallback file at once
FLUSH_EVERY_S = 10  # metrics are sent at least this often (and whenever METRIC_BATCH are waiting)


@contextmanager
def mlflow_run(cfg: DictConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[tuple[MlflowClient, str]]:
    """Open (or reopen, with run_id) a run; end it FINISHED, FAILED or KILLED with the reason as a tag.

    The run is named `tracking.run_name`, else after the experiment, made unique in its MLflow experiment.
    """
    client = connect(tracking_uri(cfg))
    if run_id is None:
        run_id = start_run(client, cfg, parent_run_id, tags)
    else:
        client.update_run(run_id, status="RUNNING")
        if names.END_REASON in client.get_run(run_id).data.tags:  # left by the stop this reopening continues from
            client.delete_tag(run_id, names.END_REASON)
    fallback = offline.run_file(cfg.out_dir, run_id)
    try:
        yield client, run_id
    except KeyboardInterrupt:
        end_run(client, run_id, "KILLED", "interrupted", fallback)
        raise
    except BaseException as err:
        end_run(client, run_id, "FAILED", f"{type(err).__name__}: {err}", fallback)
        raise
    else:
        end_run(client, run_id, "FINISHED", None, fallback)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None, fallback: Path) -> None:
    """End a run with its reason as a tag; with the server gone, the end goes to the fallback file (never hides the run's own error)."""
    try:
        if reason is not None:
            client.set_tag(run_id, names.END_REASON, reason[:TAG_CHARS])
        client.set_terminated(run_id, status=status)
    except Exception as err:
        if not server_gone(err):
            raise
        announced = fallback.exists()  # the hook wrote (and announced) it already
        offline.append(fallback, status=status, end_reason=reason)
        if not announced:
            offline.warn_lost(run_id, err, fallback)


class MLflowHook(Hooks):
    """Logs params, per-step metrics and artifacts of one training run."""

    def __init__(self, client: MlflowClient, run_id: str, log_artifacts: bool = True, sections: tuple[str, ...] = TRAIN_SECTIONS):
        self.client = client
        self.run_id = run_id
        self.log_model_artifacts = log_artifacts
        self.sections = sections
        self.buffer: list[Metric] = []
        self.last_flush = time.monotonic()
        self.logged_through: dict[str, int] = {}  # per metric, the last step the store already holds (a reopened run)
        self.log_hf_model = True
        self.lost: BaseException | None = None  # why the server stopped answering; None while it answers
        self.retry_at = 0.0
        self.pending_tags: dict[str, str] = {}  # tags sent with the next flush of metrics
        self.fallback: Path | None = None
        self.header: dict = {}  # the fallback file's first line: enough for `run.py sync` to recreate the run elsewhere

    def on_start(self, run: RunInfo) -> None:
        cfg = run.config
        self.fallback = offline.run_file(cfg.out_dir, self.run_id)
        self.log_hf_model = cfg.tracking.get("log_hf_model", True)
        self.logged_through = last_logged_steps(self.client, self.run_id)  # a resumed run never logs a step twice
        params, tags = params_and_tags(cfg, self.sections)
        facts, fact_tags = training_facts(run, distributed.launched_world_size())
        params.update(facts)
        logged = self.client.get_run(self.run_id)
        if not logged.data.params:  # a resumed run logged these already
            batch = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(batch), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=batch[i : i + PARAM_BATCH])
            self.client.log_text(self.run_id, to_yaml(cfg), names.CONFIG_ARTIFACT)
        git_tags, diff = run_tags(cfg.exp)
        tags.update({**fact_tags, **git_tags})
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if diff:
            self.client.log_text(self.run_id, diff, names.GIT_DIFF_ARTIFACT)
        experiment = self.client.get_experiment(logged.info.experiment_id).name
        self.header = offline.header(experiment, logged.info.run_name, logged.info.start_time, params, {**logged.data.tags, **tags})

    def on_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        now_ms = int(time.time() * 1000)
        for step, values in rows:
            self.buffer += [Metric(name, float(value), now_ms, step) for name, value in values.items() if step > self.logged_through.get(name, -1)]
        if len(self.buffer) >= METRIC_BATCH or time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send buffered metrics; True when the server has them all. A gone server is retried every OFFLINE_RETRY_S (or when forced)."""
        self.last_flush = time.monotonic()
        if self.lost is not None and not force and time.monotonic() < self.retry_at:
            if len(self.buffer) >= OFFLINE_SPILL:
                self.write_fallback()
            return False
        try:
            while self.buffer:
                self.client.log_batch(self.run_id, metrics=self.buffer[:METRIC_BATCH])
                del self.buffer[:METRIC_BATCH]
            if self.pending_tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.pending_tags.items()])
                self.pending_tags.clear()
        except Exception as err:
            self.went_offline(err)
            return False
        self.lost = None
        return True

    def went_offline(self, err: Exception) -> None:
        """Remember a gone server (and when to try it again); any other error is raised."""
        if not server_gone(err):
            raise err
        self.lost, self.retry_at = err, time.monotonic() + OFFLINE_RETRY_S

    def write_fallback(self) -> None:
        """Append what the server has not got to the fallback file (after its header line), and forget it here."""
        offline.append(self.fallback, self.header, self.buffer, self.pending_tags)
        self.buffer.clear()
        self.pending_tags.clear()

    def on_checkpoint(self, step: int, path: Path) -> None:
        tags = {names.CHECKPOINT_LATEST: str(path)}
        if self.flush():  # metrics first: a resume never starts after the last logged step
            try:
                if self.log_model_artifacts:  # so that another machine can resume the run
                    log_file_as(self.client, self.run_id, path, names.CHECKPOINT_ARTIFACT)
                    tags[names.CHECKPOINT_ARTIFACT_STEP] = str(step)
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                return
            except Exception as err:
                self.went_offline(err)
        self.pending_tags.update(tags)  # the server is gone: the checkpoint stays on local disk

    def on_end(self, result: TrainResult) -> None:
        """Final metric and outputs; with the server gone they stay beside the fallback file for `run.py sync`."""
        self.buffer.append(Metric(names.FINAL_VAL_LOSS, result.final_val_loss, int(time.time() * 1000), result.steps))
        finals = {names.FINAL_VAL_BPB: result.final_metrics.get(names.VAL_BPB, math.nan),
                  **{k: v for k, v in result.final_metrics.items() if k.startswith("train/share/")}}  # a mixture's token shares
        self.buffer += [Metric(k, v, int(time.time() * 1000), result.steps) for k, v in finals.items() if math.isfinite(v)]
        self.pending_tags[names.WALL_TIME] = f"{result.wall_time_s:.1f}"
        with tempfile.TemporaryDirectory() as tmp:
            write_outputs(result, Path(tmp), self.log_model_artifacts)
            if self.flush(force=True):
                try:
                    self.upload_outputs(result, Path(tmp))
                    return
                except Exception as err:
                    self.went_offline(err)
            shutil.copytree(tmp, offline.artifacts_folder(self.fallback), dirs_exist_ok=True)
        self.give_up()

    def close(self) -> None:
        """After a failed or stopped run: send what is left, or write it to the fallback file."""
        if not self.flush(force=True):
            self.give_up()

    def give_up(self) -> None:
        """The server is gone for good: what it missed goes to the fallback file (checkpoints stay on local disk)."""
        self.write_fallback()
        offline.warn_lost(self.run_id, self.lost, self.fallback)

    def upload_outputs(self, result: TrainResult, folder: Path) -> None:
        """The files write_outputs made, then the model in MLflow's transformers flavor."""
        self.client.log_artifacts(self.run_id, str(folder))
        if self.log_model_artifacts and self.log_hf_model:
            from research.export import log_llama_model

            try:
                log_llama_model(self.client, self.run_id, result.model, result.tokenizer, result.steps)
            except UserError as err:  # a model Llama cannot express still finished training
                self.client.set_tag(self.run_id, "llama_export", f"skipped: {err}"[:TAG_CHARS])
