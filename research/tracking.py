"""MLflow tracking: where the store is, and the hook that logs a run into it.

Default store: a SQLite database in results/ with artifacts beside it, so a fresh
checkout tracks with no server. `MLFLOW_TRACKING_URI` or `tracking.uri` point it
anywhere else. We use `MlflowClient` with explicit run ids (no fluent global
"active run"), so sweeps can open parent and child runs side by side.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import requests
import torch
import transformers
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research.config import REPO_ROOT, flatten, resolve_path, to_yaml
from research.errors import UserError
from research.trainer import Hooks, RunInfo, TrainResult

# mlflow sets up its own loggers when imported; keep "creating tables" chatter out of run output
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

CHECKPOINT_ARTIFACT = "checkpoints/latest.pt"  # the newest checkpoint of a run, for resuming it elsewhere
METRIC_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_BATCH = 90  # ... and 100 params
OFFLINE_RETRY_S = 30  # while a tracking server is gone, try it again this often (each try costs seconds of HTTP retries)
OFFLINE_SPILL = 100_000  # metric values held in memory while offline; more go to the fallback file at once


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{resolve_path(cfg.out_dir) / 'mlflow.db'}"


def artifact_root(cfg: DictConfig) -> str | None:
    """Artifacts of the default SQLite store live under results/mlartifacts (None: the server decides)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def connect(uri: str) -> MlflowClient:
    """A client for `uri`, failing fast with one line when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI/tracking.uri, or set tracking.enabled=false") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the MLflow store folder {db.parent} ({err.strerror}); point tracking.uri elsewhere") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"MLflow store {db} is not writable; fix its permissions or set tracking.uri / MLFLOW_TRACKING_URI to a writable store")
        with open(db.with_name(db.name + ".lock"), "a") as lock:  # processes creating one fresh store at once race in its migrations
            fcntl.flock(lock, fcntl.LOCK_EX)
            return MlflowClient(tracking_uri=uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def git_info() -> dict[str, str]:
    """Commit, dirtiness and diff of the working tree, so a logged run can be traced to code."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or "none"
        diff = git("diff", "HEAD") if commit != "none" else ""
        untracked = git("ls-files", "--others", "--exclude-standard").strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown", "diff": ""}
    return {"commit": commit, "dirty": str(bool(diff.strip() or untracked)).lower(), "diff": diff}


def run_tags(cfg: DictConfig) -> tuple[dict[str, str], str]:
    """Tags every run carries, and the working-tree diff (logged as an artifact when non-empty)."""
    info = git_info()
    return {
        "git.commit": info["commit"],
        "git.dirty": info["dirty"],
        "experiment": cfg.exp,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlflow": mlflow.__version__,
    }, info["diff"]


def start_run(client: MlflowClient, cfg: DictConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new RUNNING run in the config's experiment (under `parent_run_id` when given); returns its id."""
    exp_id = experiment_id(client, cfg.tracking.experiment or cfg.exp, artifact_root(cfg))
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=cfg.tracking.run_name or None, tags=all_tags).info.run_id


@contextmanager
def mlflow_run(cfg: DictConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[tuple[MlflowClient, str]]:
    """Open (or reopen, with run_id) a run; end it FINISHED, FAILED or KILLED with the reason as a tag."""
    client = connect(tracking_uri(cfg))
    if run_id is None:
        run_id = start_run(client, cfg, parent_run_id, tags)
    else:
        client.update_run(run_id, status="RUNNING")
        if "end_reason" in client.get_run(run_id).data.tags:  # left by the stop this reopening continues from
            client.delete_tag(run_id, "end_reason")
    try:
        yield client, run_id
    except KeyboardInterrupt:
        end_run(client, run_id, "KILLED", "interrupted", offline_path(cfg, run_id))
        raise
    except BaseException as err:
        end_run(client, run_id, "FAILED", f"{type(err).__name__}: {err}", offline_path(cfg, run_id))
        raise
    else:
        end_run(client, run_id, "FINISHED", None, offline_path(cfg, run_id))


def server_gone(err: BaseException) -> bool:
    """A tracking server that stopped answering (connection refused, timeout, 5xx), as opposed to a refused request."""
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(err, mlflow.exceptions.MlflowException) and str(err).startswith("API request to")


def offline_path(cfg: DictConfig, run_id: str) -> Path:
    """Where a run writes what its tracking server missed: JSON lines of metrics, tags and its end status."""
    return resolve_path(cfg.out_dir) / "offline" / f"{run_id}.jsonl"


def append_offline(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def warn_offline(run_id: str, err: BaseException, path: Path) -> None:
    reason = str(err).splitlines()[0][:300]
    print(f"warning: lost the MLflow tracking server during run {run_id} ({reason}); what it missed is in {path}", file=sys.stderr, flush=True)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None, fallback: Path) -> None:
    """End a run with its reason as a tag; with the server gone, the end goes to the fallback file (never hides the run's own error)."""
    try:
        if reason is not None:
            client.set_tag(run_id, "end_reason", reason[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as err:
        if not server_gone(err):
            raise
        announced = fallback.exists()  # the hook wrote (and announced) it already
        append_offline(fallback, [{"status": status, "end_reason": reason}])
        if not announced:
            warn_offline(run_id, err, fallback)


class MLflowHook(Hooks):
    """Logs params, per-step metrics and artifacts of one training run."""

    def __init__(self, client: MlflowClient, run_id: str, log_artifacts: bool = True):
        self.client = client
        self.run_id = run_id
        self.log_model_artifacts = log_artifacts
        self.buffer: list[Metric] = []
        self.last_flush = time.monotonic()
        self.logged_through: dict[str, int] = {}  # per metric, the last step the store already holds (a reopened run)
        self.log_hf_model = True
        self.lost: BaseException | None = None  # why the server stopped answering; None while it answers
        self.retry_at = 0.0
        self.pending_tags: dict[str, str] = {}  # tags sent with the next flush of metrics
        self.fallback: Path | None = None

    def on_start(self, run: RunInfo) -> None:
        cfg = run.config
        self.fallback = offline_path(cfg, self.run_id)
        self.log_hf_model = cfg.tracking.get("log_hf_model", True)
        self.logged_through = last_logged_steps(self.client, self.run_id)  # a resumed run never logs a step twice
        if not self.client.get_run(self.run_id).data.params:  # a resumed run logged these already
            params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
            for i in range(0, len(params), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + PARAM_BATCH])
            self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")
        tags, diff = run_tags(cfg)
        tags.update({"data.digest": run.data_info.data_digest, "precision": run.derived["precision"], "parameters": str(run.derived["parameters"]),
                     "data.skipped_lines": str(run.data_info.skipped_lines)})
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if diff:
            self.client.log_text(self.run_id, diff, "git_diff.patch")

    def on_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        now_ms = int(time.time() * 1000)
        for step, values in rows:
            self.buffer += [Metric(name, float(value), now_ms, step) for name, value in values.items() if step > self.logged_through.get(name, -1)]
        if len(self.buffer) >= METRIC_BATCH or time.monotonic() - self.last_flush > 10:
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
        """Append what the server has not got to the fallback file, and forget it here."""
        records = [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.buffer]
        records += [{"tag": k, "value": v} for k, v in self.pending_tags.items()]
        append_offline(self.fallback, records)
        self.buffer.clear()
        self.pending_tags.clear()

    def on_checkpoint(self, step: int, path: Path) -> None:
        tags = {"checkpoint.latest": str(path)}
        if self.flush():  # metrics first: a resume never starts after the last logged step
            try:
                if self.log_model_artifacts:  # so that another machine can resume the run
                    log_file_as(self.client, self.run_id, path, CHECKPOINT_ARTIFACT)
                    tags["checkpoint.artifact_step"] = str(step)
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                return
            except Exception as err:
                self.went_offline(err)
        self.pending_tags.update(tags)  # the server is gone: the checkpoint stays on local disk

    def on_end(self, result: TrainResult) -> None:
        self.buffer.append(Metric("final/val_loss", result.final_val_loss, int(time.time() * 1000), result.steps))
        self.pending_tags["wall_time_s"] = f"{result.wall_time_s:.1f}"
        if self.flush(force=True):
            try:
                self.log_outputs(result)
                return
            except Exception as err:
                self.went_offline(err)
        self.give_up()

    def close(self) -> None:
        """After a failed or stopped run: send what is left, or write it to the fallback file."""
        if not self.flush(force=True):
            self.give_up()

    def give_up(self) -> None:
        """The server is gone for good: what it missed goes to the fallback file (checkpoint, samples and model stay on local disk)."""
        self.write_fallback()
        warn_offline(self.run_id, self.lost, self.fallback)

    def log_outputs(self, result: TrainResult) -> None:
        """Samples, loss curve, tokenizer and model of a finished run."""
        if result.samples:
            text = "\n\n".join(f"### {prompt}\n{completion}" for prompt, completion in result.samples)
            self.client.log_text(self.run_id, text, "samples.md")
        if not self.log_model_artifacts:
            return
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "loss_curve.png"
            plot_loss_curve(result, plot)
            self.client.log_artifact(self.run_id, str(plot))
            result.tokenizer.save_pretrained(Path(tmp) / "tokenizer")
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "tokenizer"), "tokenizer")
            result.model.save_pretrained(Path(tmp) / "model")
            result.tokenizer.save_pretrained(Path(tmp) / "model")
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "model"), "model")
        if self.log_hf_model:
            from research.export import log_llama_model

            try:
                log_llama_model(self.client, self.run_id, result.model, result.tokenizer, result.steps)
            except UserError as err:  # a model Llama cannot express still finished training
                self.client.set_tag(self.run_id, "llama_export", f"skipped: {err}"[:5000])


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{metric name: highest step the run has logged}; empty for a new run."""
    names = client.get_run(run_id).data.metrics
    return {name: max(m.step for m in client.get_metric_history(run_id, name)) for name in names}


def log_file_as(client: MlflowClient, run_id: str, path: Path, artifact_path: str) -> None:
    """Log a file under another name, via a hard link beside it (a copy where links fail); replaces an earlier one."""
    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".upload-") as tmp:
        link = Path(tmp) / name
        try:
            os.link(path, link)
        except OSError:
            shutil.copyfile(path, link)
        client.log_artifact(run_id, str(link), folder or None)


def plot_loss_curve(result: TrainResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = result.curve("train/loss")
    val = result.curve("val/loss")
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
