"""Which MLflow store a config tracks to, and opening it: the client, the experiment, a gone server.

Default store: a SQLite database in results/ with artifacts beside it, so a fresh checkout
tracks with no server. `MLFLOW_TRACKING_URI` or `tracking.uri` point it anywhere else. We use
`MlflowClient` with explicit run ids (no fluent global "active run"), so sweeps can open parent
and child runs side by side. Nothing here imports torch: `run.py ui` and `run.py sync` use it.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

import mlflow
import requests
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research import registry
from research.config import resolve_path
from research.database import open_store
from research.errors import UserError
from research.names import EXPERIMENT_KIND, NOTE
from research.store_url import parse, sqlite_url

# mlflow sets up its own loggers when imported; keep "creating tables" chatter out of run output
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

METRIC_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_BATCH = 90  # ... and 100 params
# MLflow 3 opens "custom model" experiments on the classic runs table rather than on its GenAI (traces) view
# where the UI reads this tag; links add ?workflowType=machine_learning as well (research/ui.py).
KIND_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return sqlite_url(resolve_path(cfg.out_dir) / "mlflow.db")


def artifact_root(cfg: DictConfig) -> str | None:
    """Artifacts of a SQLite store live beside it (results/mlartifacts), those of another database under <out_dir>/mlartifacts
    (MLflow would pick ./mlruns in whatever folder the command ran from); a tracking server decides for itself (None)."""
    store = parse(tracking_uri(cfg))
    if store.kind == "sqlite":
        return (store.path.parent / "mlartifacts").as_uri()
    if store.is_server:
        return None
    return (resolve_path(cfg.out_dir) / "mlartifacts").as_uri()


def connect(uri: str) -> MlflowClient:
    """A client for `uri`, failing fast with one line when the store cannot be reached."""
    store = parse(uri)
    if store.kind == "http":
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"MLflow tracking server {store.masked} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI/tracking.uri, or set tracking.enabled=false") from None
    elif store.kind == "sqlite":
        db = store.path
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the MLflow store folder {db.parent} ({err.strerror}); point tracking.uri elsewhere") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"MLflow store {db} is not writable; fix its permissions or set tracking.uri / MLFLOW_TRACKING_URI to a writable store")
    return open_store(uri, lambda: MlflowClient(tracking_uri=uri), "the MLflow tracking store",  # creates the tables on first use
                      "fix tracking.uri or MLFLOW_TRACKING_URI (is the server up, the driver installed?), or set tracking.enabled=false")


def server_gone(err: BaseException) -> bool:
    """A tracking server that stopped answering (connection refused, timeout, 5xx), as opposed to a refused request."""
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(err, mlflow.exceptions.MlflowException) and str(err).startswith("API request to")


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None, description: str = "") -> str:
    """The experiment's id, created when missing; a description and the classic-view kind are added where absent."""
    wanted = {**KIND_TAGS, **({NOTE: description} if description else {})}
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


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{metric name: highest step the run has logged}; empty for a new run."""
    names = client.get_run(run_id).data.metrics
    return {name: max(m.step for m in client.get_metric_history(run_id, name)) for name in names}
