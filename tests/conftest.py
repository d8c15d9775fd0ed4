"""Shared fixtures: a tiny config that trains in seconds against a temporary MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from research import registry

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = {
    "model.hidden_size": 64,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "data.seq_len": 64,
    "train.batch_size": 4,
    "train.max_steps": 12,
    "train.warmup_steps": 3,
    "train.eval_every": 6,
    "train.eval_batches": 2,
    "train.log_every": 4,
    "train.sample_tokens": 8,
    "train.precision": "fp32",
}


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    """One token cache for the session: entries are keyed by data + tokenizer digest and written atomically."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def tiny_cfg(tmp_path, token_cache):
    """Baseline recipe shrunk to seconds, writing everything under tmp_path."""

    def make(**overrides):
        values = dict(TINY)
        values.update({"out_dir": str(tmp_path / "results"), "data.cache_dir": token_cache})
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return registry.build("baseline", values)

    return make


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess, as a user would type it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- a throwaway PostgreSQL server ----

REQUIRE_POSTGRES = "MINILM_REQUIRE_POSTGRES"  # set (as .ci/run does) to fail, not skip, when PostgreSQL is not installed
PG_USER, PG_PASSWORD = "lab", "s3cret-pw"


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own (initdb into a temporary folder, password auth, a free port on 127.0.0.1), stopped at the end.

    Yields a function that creates a fresh database and returns its `postgresql://` URL. PostgreSQL refuses to
    run as root, so under root the server runs as the `postgres` user the Debian package creates.
    """
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql); apt-get install postgresql"
        pytest.fail(message) if os.environ.get(REQUIRE_POSTGRES) else pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="minilm-pg-"))
    (folder / "pw").write_text(PG_PASSWORD)
    as_user = []
    if os.geteuid() == 0:
        for path in (folder, folder / "pw"):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(data), "-U", PG_USER, "--pwfile", str(folder / "pw"), "--auth=scram-sha-256", "--no-sync", "-E", "UTF8")
    pg("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "start",
       "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200")
    base = f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}"
    names = iter(range(1, 10_000))

    def create_database(prefix: str = "db") -> str:
        import psycopg

        name = f"{prefix}_{next(names)}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{base}/{name}"

    create_database.port = port
    try:
        yield create_database
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def last_logged_step(db, metric: str = "train/loss") -> int:
    """The highest step of `metric` in an MLflow SQLite store, read without locking it (0 while there is none)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select max(step) from metrics where key = ?", (metric,)).fetchone()[0] or 0
    except sqlite3.Error:
        return 0
