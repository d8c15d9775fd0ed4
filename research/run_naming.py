"""What a new MLflow run is called, and creating it under that name in its config's experiment.

A run is named `tracking.run_name`, else after its experiment, made unique in its MLflow
experiment (`baseline`, `baseline-2`, ...); a sweep trial is `<study run>/trial-007`.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from research.names import PARENT_RUN
from research.tracking_store import artifact_root, experiment_id, recipe_description


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
    return next_free_name(base, taken)


def next_free_name(base: str, taken: set[str]) -> str:
    """`base` when no run has it, else `base-N` one past the highest N taken."""
    if base not in taken:
        return base
    suffixes = [int(name[len(base) + 1:]) for name in taken if name.startswith(base + "-") and name[len(base) + 1:].isdigit()]
    return f"{base}-{max(suffixes, default=1) + 1}"


def trial_run_name(parent_name: str, number: int) -> str:
    """A sweep trial's run name under its study's parent run, e.g. lr_sweep/trial-007 (sorts by number)."""
    return f"{parent_name}/trial-{number:03d}"


def start_run(client: MlflowClient, cfg: DictConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new RUNNING run in the config's experiment (under `parent_run_id` when given); returns its id."""
    exp_id = experiment_id(client, cfg.tracking.experiment or cfg.exp, artifact_root(cfg), recipe_description(cfg.exp))
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_RUN] = parent_run_id
    return client.create_run(exp_id, run_name=unique_run_name(client, exp_id, cfg.tracking.run_name or cfg.exp), tags=all_tags).info.run_id
