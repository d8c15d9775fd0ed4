"""The MLflow UI screenshots of the README and docs/, regenerated: `.venv/bin/python scripts/screenshots.py` (about 3 minutes on 2 cores).

In a temporary folder it starts `mlflow server` on 127.0.0.1 and a free port, logs to it a tiny baseline
run and a tiny 4-trial sweep (both `python run.py ...` commands, on tests/data/tang_song.jsonl and a
64-wide model, grouped in one MLflow experiment), then takes headless-Chromium screenshots of

    docs/screenshots/runs.png      the experiment's runs table (classic machine-learning view), best val/loss first
    docs/screenshots/compare.png   the compare view of the sweep's trials
    docs/screenshots/summary.png   the sweep's parent run, its summary.html artifact open

and stops the server. The browser reaches the server under the name mlflow.test (mapped to 127.0.0.1):
MLflow 3 opens its Assistant panel over a third of the page when the UI is served from localhost.
Needs Chromium (`apt-get install chromium`; CHROMIUM=/path/to/chrome picks another)
and Pillow (installed with matplotlib). Nothing is written outside the temporary folder but the PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlflow.tracking import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from research.ui import CLASSIC_VIEW, run_url, server_command, start_server, stop_server, wait_until_healthy  # noqa: E402

OUT = REPO / "docs" / "screenshots"
EXPERIMENT = "lr_sweep"  # the baseline run is logged beside the sweep (tracking.experiment), so that one table holds both
HOST = "mlflow.test"  # the name the browser uses for 127.0.0.1 (see above)
WINDOW = (1400, 1000)  # browser window, CSS pixels: the size of the saved PNGs
RENDER_MS = 40_000  # virtual time the UI gets to fetch its data and draw (it is a JS app; the summary page embeds its plots)
SMALL_RUN = [
    "data.path=tests/data/tang_song.jsonl", "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
    "model.num_key_value_heads=2", "data.seq_len=64", "train.batch_size=8", "train.max_steps=40", "train.eval_every=10",
    "train.eval_batches=2", "train.log_every=5", "train.precision=fp32", "tracking.log_hf_model=false", f"tracking.experiment={EXPERIMENT}",
]
SWEEP = ["exp=lr_sweep", "sweep.n_trials=4", "train.warmup_steps=0", "train.sample_tokens=0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_py(*args: str) -> None:
    """`python run.py ARGS`, as a user types it; its output goes to this terminal."""
    subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, check=True)


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if not found:
        sys.exit("error: no Chromium found; apt-get install chromium, or set CHROMIUM=/path/to/chrome")
    return found


def screenshot(url: str, path: Path, profile: Path) -> None:
    """A headless-Chromium screenshot of `url` once the page had RENDER_MS of virtual time, saved with a 256-colour palette."""
    raw = path.with_suffix(".raw.png")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--hide-scrollbars", f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           f"--virtual-time-budget={RENDER_MS}", f"--screenshot={raw}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    with Image.open(raw) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)
    raw.unlink()
    print(f"{path}: {url}")


def pages(base: str, client: MlflowClient) -> dict[str, str]:
    """{file name: URL} of the three pages to show."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "sweep.study_name" in r.data.tags and "mlflow.parentRunId" not in r.data.tags)
    trials = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), key=lambda r: r.info.run_name)
    compact = {"separators": (",", ":")}
    query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in trials], **compact), "experiments": json.dumps([experiment.experiment_id], **compact)})
    by_loss = urllib.parse.urlencode({"orderByKey": "metrics.`val/loss`", "orderByAsc": "true"})  # sorted by a metric, the table lists child runs flat
    return {
        "runs.png": f"{base}/#/experiments/{experiment.experiment_id}/runs?{CLASSIC_VIEW}&{by_loss}",
        "compare.png": f"{base}/#/compare-runs?{query}&{CLASSIC_VIEW}",
        "summary.png": run_url(base, experiment.experiment_id, parent.info.run_id, "artifacts/summary.html"),  # the classic run page
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        folder = Path(tmp)
        port = free_port()
        local, shown = f"http://127.0.0.1:{port}", f"http://{HOST}:{port}"
        cmd = server_command(f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri(), "127.0.0.1", port)
        cmd += ["--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port}", "--cors-allowed-origins", shown]
        with open(folder / "server.log", "w") as log:
            server = start_server(cmd, log)
        try:
            wait_until_healthy(local, server)
            common = [*SMALL_RUN, f"tracking.uri={local}", f"out_dir={folder / 'results'}"]
            run_py(*SWEEP, *common)  # first: the experiment takes its description from the recipe that creates it
            run_py("exp=baseline", *common)
            for name, url in pages(shown, MlflowClient(local)).items():
                screenshot(url, OUT / name, folder / "chromium")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
