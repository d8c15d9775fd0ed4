"""The offline-run format: what a run that lost its tracking server leaves for `python run.py sync`, written and read here.

`<out_dir>/offline/<run_id>.jsonl` holds one JSON object a line:

    {"run": {"experiment", "run_name", "start_time", "params", "tags"}}   the header, first: enough to recreate the run elsewhere
                                                                         (absent when the run lost its server only while ending)
    {"metric": NAME, "value": V, "timestamp": MS, "step": N}             a metric point the server missed
    {"tag": NAME, "value": TEXT}                                         a tag it missed
    {"status": "FINISHED" | "FAILED" | "KILLED", "end_reason": TEXT}     the end, last (end_reason null when it finished)

and `<out_dir>/offline/<run_id>/` the artifacts (model, samples, loss curve) it could not upload.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mlflow.entities import Metric

from research.config import resolve_path

FOLDER = "offline"  # under out_dir


@dataclass
class OfflineRun:
    """What one run file holds."""

    run_id: str
    path: Path
    header: dict = field(default_factory=dict)  # {} when the run lost its server only while ending
    metrics: list[Metric] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    status: str | None = None  # None: the run is still going, or its process died
    end_reason: str | None = None


def offline_dir(out_dir: str) -> Path:
    """Where runs that lost their tracking server leave what it missed."""
    return resolve_path(out_dir) / FOLDER


def run_file(out_dir: str, run_id: str) -> Path:
    """A run's file of what its server missed."""
    return offline_dir(out_dir) / f"{run_id}.jsonl"


def artifacts_folder(path: Path) -> Path:
    """Beside a run file: the artifacts the server never got."""
    return path.with_suffix("")


def header(experiment: str, run_name: str, start_time: int, params: dict[str, str], tags: dict[str, str]) -> dict:
    """The header's content: what `sync` needs to recreate the run on a server that lacks it."""
    return {"experiment": experiment, "run_name": run_name, "start_time": start_time, "params": params, "tags": tags}


def append(path: Path, run_header: dict | None = None, metrics: Sequence[Metric] = (), tags: dict[str, str] | None = None,
           status: str | None = None, end_reason: str | None = None) -> None:
    """Add records to a run file: the header only when the file is new, then metric points, tags and the end status."""
    records = [{"run": run_header}] if run_header and not path.exists() else []
    records += [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics]
    records += [{"tag": k, "value": v} for k, v in (tags or {}).items()]
    if status is not None:
        records.append({"status": status, "end_reason": end_reason})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def read(path: Path) -> OfflineRun:
    """Everything a run file holds; a later tag or status overrides an earlier one."""
    run = OfflineRun(run_id=path.stem, path=path)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "run" in record:
            run.header = record["run"]
        elif "metric" in record:
            run.metrics.append(Metric(record["metric"], record["value"], record["timestamp"], record["step"]))
        elif "tag" in record:
            run.tags[record["tag"]] = record["value"]
        elif "status" in record:
            run.status, run.end_reason = record["status"], record["end_reason"]
    return run


def run_files(folder: Path) -> list[Path]:
    """The run files waiting in `folder` (those already synced live in its synced/ subfolder)."""
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def warn_lost(run_id: str, err: BaseException, path: Path) -> None:
    """One line on stderr: the server is gone, what it missed is in `path`, and the command that uploads it."""
    reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
    out_dir = path.parent.parent
    command = "python run.py sync" + ("" if out_dir == resolve_path("results") else f" out_dir={out_dir}")
    print(f"warning: lost the MLflow tracking server during run {run_id} ({reason}); what it missed is in {path}; "
          f"upload it with `{command}` once the server is back", file=sys.stderr, flush=True)
