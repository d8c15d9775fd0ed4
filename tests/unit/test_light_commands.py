"""The commands that only read config or talk to MLflow start without torch or transformers (seconds of imports)."""

import socket
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "transformers")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime run.py ARGS`; every module the command imported, by name."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line}
    return proc, modules - {"imported package"}


@pytest.mark.parametrize("args", [["--help"], ["list"], ["keys"]])
def test_listings_import_no_torch(args):
    proc, modules = imported_modules(*args)
    assert proc.returncode == 0 and "research.config" in modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY]


def test_sync_imports_no_torch(tmp_path):
    proc, modules = imported_modules("sync", f"out_dir={tmp_path}")
    assert proc.returncode == 0 and "nothing left to sync" in proc.stdout, proc.stderr[-2000:]
    assert {"research.sync", "research.offline", "mlflow"} <= modules and (tmp_path / "mlflow.db").exists()  # it opened the store
    assert not [m for m in modules if m.split(".")[0] in HEAVY]


def test_ui_imports_no_torch(tmp_path):
    with socket.socket() as busy:  # the UI refuses a port in use: everything up to starting the server is imported by then
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc, modules = imported_modules("ui", f"out_dir={tmp_path}", f"port={busy.getsockname()[1]}")
    assert proc.returncode == 2 and "is in use" in proc.stderr
    assert {"research.ui", "research.tracking_store", "mlflow"} <= modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    proc, modules = imported_modules("ui", "tracking.uri=http://127.0.0.1:9")  # a tracking server: find the experiment on it (none answers here)
    assert proc.returncode == 2 and "unreachable" in proc.stderr and not [m for m in modules if m.split(".")[0] in HEAVY]
