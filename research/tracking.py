"""MLflow tracking: where the store is, and the hook that logs a run into it.

Default store: a SQLite database in results/ with artifacts beside it, so a fresh
checkout tracks with no server. `MLFLOW_TRACKING_URI` or `tracking.uri` point it
anywhere else. We use `MlflowClient` with explicit run ids (no fluent global
"active run"), so sweeps can open parent and child runs side by side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
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

from research import distributed, registry
from research.config import REPO_ROOT, flatten, resolve_path, to_yaml
from research.database import mask_password, open_store
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
UNTRACKED_TAG_CHARS = 1000  # the git.untracked tag lists untracked files up to this length

# The config sections each kind of run logs as params (what its numbers depend on). `tracking.*` is left
# out (where and under which name a run is logged changes no number); `out_dir` is logged, as a tag.
TRAIN_SECTIONS = ("exp", "seed", "out_dir", "data", "model", "train")
SWEEP_SECTIONS = (*TRAIN_SECTIONS, "sweep")  # a study's parent run: the recipe and the search space
# Keys whose value names this machine (folders, stores): tags, whatever their value. Absolute paths
# outside the repo, URLs and a numbered device (cuda:1) anywhere in the logged sections are tags too.
MACHINE_KEYS = frozenset({"out_dir", "data.cache_dir", "train.checkpoint_dir", "train.resume_from", "tracking.uri", "sweep.storage", "sweep.report_dir", "bench.out"})
TOKENS_PER_STEP = "tokens_per_step"  # param: train.batch_size x data.seq_len x train.grad_accum x ranks, kept by a resume on other ranks
WORLD_SIZE = "world_size"  # tag: the ranks of the run's latest start (a machine fact)
# Experiment tags: the recipe's docstring as the description; MLflow 3 opens "custom model" experiments
# on the classic runs table rather than on its GenAI (traces) view.
NOTE_TAG = "mlflow.note.content"
KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# How a sweep trial's MLflow run ends, by Optuna state name: a pruned trial stopped early on purpose
# (tag sweep.state=PRUNED tells it apart), which is not a failure (KILLED shows red in the UI).
TRIAL_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{resolve_path(cfg.out_dir) / 'mlflow.db'}"


def artifact_root(cfg: DictConfig) -> str | None:
    """Artifacts of a SQLite store live beside it (results/mlartifacts), those of another database under <out_dir>/mlartifacts
    (MLflow would pick ./mlruns in whatever folder the command ran from); a tracking server decides for itself (None)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (resolve_path(cfg.out_dir) / "mlartifacts").as_uri()


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
    return open_store(uri, lambda: MlflowClient(tracking_uri=uri), "the MLflow tracking store",  # creates the tables on first use
                      "fix tracking.uri or MLFLOW_TRACKING_URI (is the server up, the driver installed?), or set tracking.enabled=false")


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None, description: str = "") -> str:
    """The experiment's id, created when missing; a description and the classic-view kind are added where absent."""
    wanted = {**KIND_TAGS, **({NOTE_TAG: description} if description else {})}
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=wanted)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
    for key, value in wanted.items():
        if key not in found.tags:  # never overwrite a description edited in the UI
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def recipe_description(exp: str) -> str:
    """The experiment recipe's docstring (experiments/<exp>.py), shown as the MLflow experiment's description."""
    if exp not in registry.names():
        return ""
    return (registry.load(exp).__doc__ or "").strip()


def unique_run_name(client: MlflowClient, exp_id: str, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... when the experiment has that name already (one search; names compared here)."""
    prefix = base.split("'")[0]  # quotes cannot be escaped in a filter string; the exact match is checked below
    taken, token = set(), None
    while True:
        page = client.search_runs([exp_id], filter_string=f"attributes.run_name LIKE '{prefix}%'", max_results=1000, page_token=token)
        taken.update(run.info.run_name for run in page)
        token = page.token
        if not token:
            break
    if base not in taken:
        return base
    suffixes = [int(name[len(base) + 1:]) for name in taken if name.startswith(base + "-") and name[len(base) + 1:].isdigit()]
    return f"{base}-{max(suffixes, default=1) + 1}"


def trial_run_name(parent_name: str, number: int) -> str:
    """A sweep trial's run name under its study's parent run, e.g. lr_sweep/trial-007 (sorts by number)."""
    return f"{parent_name}/trial-{number:03d}"


def params_and_tags(cfg: DictConfig, sections: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """The config keys of `sections` split into params (same text on any machine, so Compare diffs only
    what changes results) and tags (values that name this machine: folders, stores, device numbers)."""
    params, tags = {}, {}
    for key, value in flatten(cfg).items():
        if key.split(".")[0] not in sections:
            continue
        text = portable_value(key, value)
        if text is not None:
            params[key] = text[:6000]
        elif str(value):
            tags[key] = mask_password(str(value))[:5000]
    return params, tags


def portable_value(key: str, value) -> str | None:
    """`value` as text that reads the same on every machine (a path inside the repo made relative), or None."""
    text = str(value)
    if key in MACHINE_KEYS or "://" in text or (key == "train.device" and ":" in text):
        return None
    if text.startswith(("/", "~")):
        path = Path(text).expanduser().resolve()
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else None
    return text


def git_info() -> dict[str, str]:
    """Commit, dirtiness and diff of the working tree, so a logged run can be traced to code."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or "none"
        diff = git("diff", "HEAD") if commit != "none" else ""
        untracked = git("ls-files", "--others", "--exclude-standard", "--directory").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown", "diff": "", "untracked": ""}
    return {"commit": commit, "dirty": str(bool(diff.strip())).lower(), "diff": diff, "untracked": bounded_list(untracked, UNTRACKED_TAG_CHARS)}


def bounded_list(items: list[str], limit: int) -> str:
    """Items joined by spaces, cut to about `limit` characters with a count of what was left out."""
    text, shown = "", 0
    for item in items:
        if len(text) + len(item) + 1 > limit:
            return f"{text} ... (+{len(items) - shown} more)".strip()
        text, shown = f"{text} {item}".strip(), shown + 1
    return text


def run_tags(cfg: DictConfig) -> tuple[dict[str, str], str]:
    """Tags every run carries, and the diff of tracked files (logged as git_diff.patch when git.dirty is true)."""
    info = git_info()
    return {
        "git.commit": info["commit"],
        "git.dirty": info["dirty"],
        **({"git.untracked": info["untracked"]} if info["untracked"] else {}),
        "experiment": cfg.exp,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlflow": mlflow.__version__,
    }, info["diff"]


def start_run(client: MlflowClient, cfg: DictConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new RUNNING run in the config's experiment (under `parent_run_id` when given); returns its id."""
    exp_id = experiment_id(client, cfg.tracking.experiment or cfg.exp, artifact_root(cfg), recipe_description(cfg.exp))
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=unique_run_name(client, exp_id, cfg.tracking.run_name or cfg.exp), tags=all_tags).info.run_id


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


def offline_dir(cfg: DictConfig) -> Path:
    """Where runs that lost their tracking server leave what it missed, for `python run.py sync`."""
    return resolve_path(cfg.out_dir) / "offline"


def offline_path(cfg: DictConfig, run_id: str) -> Path:
    """A run's fallback file: JSON lines of its header (experiment, name, params, tags), metrics, tags and end status."""
    return offline_dir(cfg) / f"{run_id}.jsonl"


def offline_artifacts(fallback: Path) -> Path:
    """Beside the fallback file: the artifacts (model, samples, loss curve) the server never got."""
    return fallback.with_suffix("")


def append_offline(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def warn_offline(run_id: str, err: BaseException, path: Path) -> None:
    reason = str(err).splitlines()[0][:300]
    out_dir = path.parent.parent
    command = "python run.py sync" + ("" if out_dir == resolve_path("results") else f" out_dir={out_dir}")
    print(f"warning: lost the MLflow tracking server during run {run_id} ({reason}); what it missed is in {path}; "
          f"upload it with `{command}` once the server is back", file=sys.stderr, flush=True)


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
        self.fallback = offline_path(cfg, self.run_id)
        self.log_hf_model = cfg.tracking.get("log_hf_model", True)
        self.logged_through = last_logged_steps(self.client, self.run_id)  # a resumed run never logs a step twice
        params, tags = params_and_tags(cfg, self.sections)
        params[TOKENS_PER_STEP] = str(run.derived["tokens per step"])  # the global batch changes results; how many ranks took it does not
        tags[WORLD_SIZE] = str(distributed.launched_world_size())
        logged = self.client.get_run(self.run_id)
        if not logged.data.params:  # a resumed run logged these already
            batch = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(batch), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=batch[i : i + PARAM_BATCH])
            self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")
        git_tags, diff = run_tags(cfg)
        tags.update(git_tags)
        tags.update({"data.digest": run.data_info.data_digest, "precision": run.derived["precision"], "parameters": str(run.derived["parameters"]),
                     "data.skipped_lines": str(run.data_info.skipped_lines)})
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if diff:
            self.client.log_text(self.run_id, diff, "git_diff.patch")
        self.header = {"run": {"experiment": self.client.get_experiment(logged.info.experiment_id).name, "run_name": logged.info.run_name,
                               "start_time": logged.info.start_time, "params": params, "tags": {**logged.data.tags, **tags}}}

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
        """Append what the server has not got to the fallback file (after its header line), and forget it here."""
        records = [] if self.fallback.exists() or not self.header else [self.header]
        records += [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.buffer]
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
        """Final metric and outputs; with the server gone they stay beside the fallback file for `run.py sync`."""
        self.buffer.append(Metric("final/val_loss", result.final_val_loss, int(time.time() * 1000), result.steps))
        self.pending_tags["wall_time_s"] = f"{result.wall_time_s:.1f}"
        with tempfile.TemporaryDirectory() as tmp:
            write_outputs(result, Path(tmp), self.log_model_artifacts)
            if self.flush(force=True):
                try:
                    self.upload_outputs(result, Path(tmp))
                    return
                except Exception as err:
                    self.went_offline(err)
            shutil.copytree(tmp, offline_artifacts(self.fallback), dirs_exist_ok=True)
        self.give_up()

    def close(self) -> None:
        """After a failed or stopped run: send what is left, or write it to the fallback file."""
        if not self.flush(force=True):
            self.give_up()

    def give_up(self) -> None:
        """The server is gone for good: what it missed goes to the fallback file (checkpoints stay on local disk)."""
        self.write_fallback()
        warn_offline(self.run_id, self.lost, self.fallback)

    def upload_outputs(self, result: TrainResult, folder: Path) -> None:
        """The files write_outputs made, then the model in MLflow's transformers flavor."""
        self.client.log_artifacts(self.run_id, str(folder))
        if self.log_model_artifacts and self.log_hf_model:
            from research.export import log_llama_model

            try:
                log_llama_model(self.client, self.run_id, result.model, result.tokenizer, result.steps)
            except UserError as err:  # a model Llama cannot express still finished training
                self.client.set_tag(self.run_id, "llama_export", f"skipped: {err}"[:5000])


def write_outputs(result: TrainResult, folder: Path, with_model: bool) -> None:
    """A finished run's artifacts as files: samples.md, and with the model: loss_curve.png, tokenizer/, model/."""
    if result.samples:
        (folder / "samples.md").write_text(samples_markdown(result.samples))
    if not with_model:
        return
    plot_loss_curve(result, folder / "loss_curve.png")
    result.tokenizer.save_pretrained(folder / "tokenizer")
    result.model.save_pretrained(folder / "model")
    result.tokenizer.save_pretrained(folder / "model")


def samples_markdown(samples: list[tuple[str, str]]) -> str:
    """Each prompt as a heading and its completion in a fenced block, so the artifact viewer keeps its line breaks."""
    fence = "````"  # longer than any fence a completion could hold
    return "\n\n".join(f"### {prompt}\n\n{fence}text\n{completion.replace(fence, '```')}\n{fence}" for prompt, completion in samples) + "\n"


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
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    train = result.curve("train/loss")
    val = result.curve("val/loss")
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")  # plain numbers on the ticks (not 8x10^0), minor ticks labelled when under a decade is shown
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.7)))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
