"""The MLflow UI for a tracking store: opened on the classic views, stopped with everything it started.

MLflow 3's UI shows experiments and runs in its GenAI (traces) view unless the page's URL asks for
`workflowType=machine_learning` (else it keeps the view last chosen in that browser, GenAI at
first); the `mlflow.experimentKind` tag does not decide it. So every link we print carries it:
`experiment_url`, `run_url`. `mlflow server` spawns uvicorn workers; it runs in a session of
its own, so stopping it kills the whole process group, workers included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from research.errors import UserError
from research.store_url import parse

CLASSIC_VIEW = "workflowType=machine_learning"
STOP_GRACE_S = 10  # after SIGTERM, how long the server's process group gets before SIGKILL


def experiment_url(base_url: str, experiment_id: str | None) -> str:
    """The UI page of one experiment (or of the experiment list) on the classic runs view."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base_url.rstrip('/')}/#/{page}?{CLASSIC_VIEW}"


def run_url(base_url: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """The UI page of one run on the classic run view; `tab` opens one of its tabs (e.g. artifacts/summary.html)."""
    page = f"experiments/{experiment_id}/runs/{run_id}" + (f"/{tab.strip('/')}" if tab else "")
    return f"{base_url.rstrip('/')}/#/{page}?{CLASSIC_VIEW}"


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment `name` in the store at `uri`; None when it has no such experiment."""
    from research.tracking_store import connect

    found = connect(uri).get_experiment_by_name(name)
    return found.experiment_id if found else None


def server_command(uri: str, artifact_root: str | None, host: str, port: int) -> list[str]:
    """`mlflow server` on a database store, with one worker (a single person browsing)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    cmd += ["--registry-store-uri", uri]  # the model registry in the same database (else MLflow guesses one from the environment)
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    return cmd


def start_server(cmd: list[str], log=None) -> subprocess.Popen:
    """Start a server in its own session, so that stop_server reaches the workers it spawns."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once `url`/health answers; a UserError when the server exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise UserError(f"mlflow server exited with status {proc.returncode} before answering at {url}") from None
            if time.monotonic() > deadline:
                raise UserError(f"mlflow server did not answer at {url} within {timeout_s:.0f} s") from None
            time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, SIGKILL to whatever is left after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie still counts as a member of its group
            if not group_alive(proc.pid):
                return
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt here, so that one cleanup path serves them and Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_ui(uri: str, artifact_root: str | None, experiment: str, host: str, port: int) -> int:
    """Serve the UI on a database store until Ctrl-C or SIGTERM; for a tracking server, print where to open it."""
    if parse(uri).kind == "http":
        print(f"the tracking store is a server; open {experiment_url(uri, find_experiment(uri, experiment))}", flush=True)
        return 0
    if not port_is_free(host, port):
        raise UserError(f"port {port} on {host} is in use (another UI?); pass port=N")
    experiment_id = find_experiment(uri, experiment)
    base = f"http://{host}:{port}"
    with sigterm_as_interrupt():
        proc = start_server(server_command(uri, artifact_root, host, port))
        try:
            wait_until_healthy(base, proc)
            print(f"MLflow UI on {parse(uri).masked}\nopen {experiment_url(base, experiment_id)}\n(Ctrl-C stops it)", flush=True)
            proc.wait()
            return 0 if proc.returncode in (0, -signal.SIGTERM) else proc.returncode
        except KeyboardInterrupt:
            return 0
        finally:
            stop_server(proc)
