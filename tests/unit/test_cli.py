"""run.py as a user types it: listings, and one clear line with exit status 2 for bad input."""

import os
import subprocess
import sys

from conftest import REPO, assert_one_line_error, run_cli


def test_list_shows_experiments_with_descriptions():
    proc = run_cli("list")
    assert proc.returncode == 0
    assert "baseline" in proc.stdout and "Shakespeare" in proc.stdout
    assert run_cli("--help").stdout == proc.stdout


def test_keys_lists_required_names():
    out = run_cli("keys").stdout
    for key in ["seed", "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.warmup_steps",
                "train.min_lr_ratio", "train.precision", "train.eval_every", "model.hidden_size", "model.num_hidden_layers",
                "model.num_attention_heads", "model.num_key_value_heads", "model.vocab_size", "data.path", "data.seq_len", "data.packing",
                "tracking.experiment"]:
        assert f"{key} = " in out, key


def test_unknown_experiment():
    assert_one_line_error(run_cli("exp=baselin"), "unknown experiment 'baselin'", "did you mean 'baseline'")


def test_unknown_key_suggests_the_right_one():
    assert_one_line_error(run_cli("train.lrr=0.1"), "unknown config key 'train.lrr'", "train.lr", "valid keys under 'train'")


def test_wrong_type():
    assert_one_line_error(run_cli("train.max_steps=ten"), "train.max_steps", "'ten'", "int")
    assert_one_line_error(run_cli("data.packing=maybe"), "data.packing", "bool")


def test_missing_equals_sign():
    assert_one_line_error(run_cli("train.lr"), "expected key=value")


def test_impossible_values_are_caught_before_work():
    assert_one_line_error(run_cli("train.lr=-1"), "train.lr must be > 0")
    assert_one_line_error(run_cli("train.warmup_steps=500", "train.max_steps=100"), "warmup_steps")
    assert_one_line_error(run_cli("train.min_lr_ratio=1.5"), "min_lr_ratio")
    assert_one_line_error(run_cli("model.num_attention_heads=5"), "model.num_attention_heads (5) must divide model.hidden_size")
    assert_one_line_error(run_cli("model.num_key_value_heads=3"), "model.num_key_value_heads (3) must divide")
    assert_one_line_error(run_cli("train.precision=fp16", "train.device=cpu"), "fp16 needs a CUDA device")


def openmp_settings(env: dict) -> str:
    """What OpenMP would read in a process started by run.py, and whether torch was imported before that was set."""
    code = "import os, sys, run; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    full_env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | env
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, check=True).stdout.split()


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise():
    assert openmp_settings({}) == ["20000", "None", "False"]  # set before torch (and OpenMP) is loaded
    assert openmp_settings({"OMP_WAIT_POLICY": "ACTIVE"}) == ["None", "ACTIVE", "False"]
    assert openmp_settings({"GOMP_SPINCOUNT": "300000"}) == ["300000", "None", "False"]
