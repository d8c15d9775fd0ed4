"""Shared fixtures: a tiny config that trains in seconds against a temporary MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
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
