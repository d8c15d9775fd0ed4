"""Crash-safe checkpoints, resume and reproduce: real kills and signals, real stores, bit-for-bit comparisons.

Every run here is single-threaded (train.threads=1) with dropout on, so that the
weights and losses of a resumed run can be compared exactly with an uninterrupted
one, and a forgotten piece of RNG state shows up as a difference.
"""

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli
from research import registry
from research.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint, prune_checkpoints
from research.errors import UserError
from run import main as resume_or_reproduce
from research.runner import run_tracked
from research.trainer import Hooks, train

MAX_STEPS = 16
RUN = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2, "model.num_key_value_heads": 1, "model.dropout": 0.1,
    "data.seq_len": 32, "train.batch_size": 2, "train.max_steps": MAX_STEPS, "train.warmup_steps": 2, "train.eval_every": 8,
    "train.eval_batches": 1, "train.log_every": 4, "train.sample_tokens": 0, "train.threads": 1, "train.precision": "fp32",
    "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "tracking.log_hf_model": False,
}


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """Runs here set torch to one thread; give the other test modules back what they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with its own copy of the corpus (one test changes it) and a token cache the runs share."""
    root = tmp_path_factory.mktemp("resume")
    shutil.copy(REPO / "tests" / "data" / "tang_song.jsonl", root / "data.jsonl")
    return root


def settings(root: Path, out: Path, **extra) -> dict:
    return {**RUN, "out_dir": str(out), "data.cache_dir": str(root / "cache"), "data.path": str(root / "data.jsonl"), **extra}


def cli_args(root: Path, out: Path) -> list[str]:
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in settings(root, out).items()]


def store(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def losses(out: Path, run_id: str) -> dict[int, float]:
    """{step: train/loss} from the store, after checking that every step was logged exactly once."""
    history = store(out).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, MAX_STEPS + 1))
    return {m.step: m.value for m in history}


def final_weights(out: Path, run_id: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / run_id / f"step_{MAX_STEPS:08d}.pt")["state"]["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [name for name in a if not torch.equal(a[name], b[name])]


@pytest.fixture(scope="module")
def reference(root):
    """One uninterrupted run: what every stopped and resumed run must equal, bit for bit."""
    out = root / "reference"
    result = run_tracked(registry.build("baseline", settings(root, out)))
    return {"out": out, "run_id": result.run_id, "losses": losses(out, result.run_id), "weights": final_weights(out, result.run_id),
            "val": result.final_val_loss}


def start_cli(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *cli_args(root, out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, min_step: int, proc: subprocess.Popen) -> Path:
    """The run's checkpoint folder, once a checkpoint of step >= min_step exists."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for folder in (out / "checkpoints").glob("*"):
            if any(checkpoint_step(p) >= min_step for p in list_checkpoints(folder)):
                return folder
        assert proc.poll() is None, f"the run ended before step {min_step}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step {min_step} within 180 s")


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(root, reference):
    out = root / "killed"
    proc = start_cli(root, out)
    kill_at = random.randint(6, 10)
    folder = wait_for_checkpoint(out, kill_at, proc)
    time.sleep(random.uniform(0, 0.05))  # anywhere in the step, the checkpoint write and the logging included
    proc.kill()
    proc.communicate()
    run_id = folder.name
    assert store(out).get_run(run_id).info.status == "RUNNING"  # nobody could mark it
    # The worst moment for a kill: metrics already logged past the newest checkpoint that survives.
    logged = max(m.step for m in store(out).get_metric_history(run_id, "train/loss"))
    while checkpoint_step(list_checkpoints(folder)[-1]) >= logged:
        list_checkpoints(folder)[-1].unlink()
    survivor = checkpoint_step(list_checkpoints(folder)[-1])

    assert resume_or_reproduce([f"resume={run_id}", f"out_dir={out}"]) == 0

    run = store(out).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(survivor)
    assert losses(out, run_id) == reference["losses"], f"killed near step {kill_at}"
    assert_same_weights(final_weights(out, run_id), reference["weights"])
    assert run.data.metrics["final/val_loss"] == reference["val"]


def test_sigterm_checkpoints_marks_killed_and_the_printed_command_resumes_elsewhere(root, reference):
    out = root / "terminated"
    proc = start_cli(root, out)
    folder = wait_for_checkpoint(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    run_id = folder.name
    run = store(out).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "interrupted"
    stopped = int(re.search(r"SIGTERM: stopped after step (\d+)", stdout).group(1))
    assert 2 <= stopped < MAX_STEPS
    assert checkpoint_step(list_checkpoints(folder)[-1]) == stopped  # saved at the step boundary, odd steps too
    assert max(m.step for m in store(out).get_metric_history(run_id, "train/loss")) == stopped
    command = shlex.split(stderr.split("continue this run with: ", 1)[1].splitlines()[0])
    assert command[:3] == ["python", "run.py", f"resume={run_id}"]

    shutil.rmtree(folder)  # as on another machine: only the run's checkpoint artifact is left
    proc = run_cli(*command[2:])
    assert proc.returncode == 0, proc.stderr
    assert f"fetched the step-{stopped} checkpoint" in proc.stdout
    run = store(out).get_run(run_id)
    assert run.info.status == "FINISHED" and "end_reason" not in run.data.tags
    assert losses(out, run_id) == reference["losses"]
    assert_same_weights(final_weights(out, run_id), reference["weights"])


class CtrlCAtStep3(Hooks):
    def on_metrics(self, rows):
        if rows[-1][0] == 3:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_at_a_step_boundary_restores_handlers_and_resumes(root, reference, capsys):
    out = root / "interrupted"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # logging and checkpoint intervals differ from the reference's: they must not change a number
    cfg = registry.build("baseline", settings(root, out, **{"train.log_every": 3, "train.checkpoint_every": 5}))
    with pytest.raises(KeyboardInterrupt):
        run_tracked(cfg, [CtrlCAtStep3()])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    run_id = Path(cfg.train.checkpoint_dir).name
    assert store(out).get_run(run_id).info.status == "KILLED"
    assert [checkpoint_step(p) for p in list_checkpoints(cfg.train.checkpoint_dir)] == [3]
    assert f"continue this run with: python run.py resume={run_id} out_dir={out}" in capsys.readouterr().err

    assert resume_or_reproduce([f"resume={run_id}", f"out_dir={out}"]) == 0
    assert store(out).get_run(run_id).info.status == "FINISHED"
    assert losses(out, run_id) == reference["losses"]
    assert_same_weights(final_weights(out, run_id), reference["weights"])


def test_a_resumed_mup_run_equals_the_uninterrupted_one(root):
    """μP adds an optimizer group at lr / m (research/step.py): its scale must come back from the checkpoint."""
    mup = {"model.parametrization": "mup", "model.base_width": 16, "model.mup_input_mult": 2.0}
    full = run_tracked(registry.build("baseline", settings(root, root / "mup-full", **mup)))
    out = root / "mup-stopped"
    cfg = registry.build("baseline", settings(root, out, **mup, **{"train.log_every": 3, "train.checkpoint_every": 5}))
    with pytest.raises(KeyboardInterrupt):
        run_tracked(cfg, [CtrlCAtStep3()])
    run_id = Path(cfg.train.checkpoint_dir).name
    assert resume_or_reproduce([f"resume={run_id}", f"out_dir={out}"]) == 0
    assert losses(out, run_id) == losses(root / "mup-full", full.run_id)
    assert_same_weights(final_weights(out, run_id), final_weights(root / "mup-full", full.run_id))


def test_reproduce_repeats_the_curve_and_refuses_changed_data(root, reference, capsys):
    out, original = reference["out"], reference["run_id"]
    assert resume_or_reproduce([f"reproduce={original}", f"out_dir={out}"]) == 0
    assert f"reproduction of {original}: identical" in capsys.readouterr().out
    client = store(out)
    experiment = client.get_run(original).info.experiment_id
    [copy] = client.search_runs([experiment], f"tags.reproduced_from = '{original}'")
    assert losses(out, copy.info.run_id) == reference["losses"]
    assert copy.data.metrics["reproduce/max_abs_train_loss_diff"] == 0.0
    assert copy.data.metrics["reproduce/original_final_val_loss"] == reference["val"] == copy.data.metrics["final/val_loss"]
    assert copy.data.tags["reproduce.identical"] == "true"
    assert_same_weights(final_weights(out, copy.info.run_id), reference["weights"])

    data = root / "data.jsonl"
    original_bytes = data.read_bytes()
    try:
        data.write_bytes(original_bytes + '{"text": "一行新诗"}\n'.encode())
        with pytest.raises(UserError, match="changed since run .*allow_data_change=true") as refused:
            resume_or_reproduce([f"reproduce={original}", f"out_dir={out}"])
        assert "\n" not in str(refused.value)
        assert len(client.search_runs([experiment], f"tags.reproduced_from = '{original}'")) == 1
    finally:
        data.write_bytes(original_bytes)


def test_finished_unknown_refused_and_unreachable_runs_are_one_line(root, reference, capsys, monkeypatch):
    out, run_id = reference["out"], reference["run_id"]
    client = store(out)
    before = client.get_run(run_id)
    assert resume_or_reproduce([f"resume={run_id}", f"out_dir={out}"]) == 0
    assert capsys.readouterr().out.strip() == f"run {run_id} already finished; nothing to resume"
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time, after.data.tags) == (before.info.status, before.info.end_time, before.data.tags)
    assert len(client.get_metric_history(run_id, "train/loss")) == MAX_STEPS

    no_config = client.create_run(before.info.experiment_id).info.run_id
    for args, message in [
        (["resume=0123456789abcdef0123456789abcdef", f"out_dir={out}"], "no run '0123456789abcdef0123456789abcdef'"),
        ([f"reproduce={no_config}", f"out_dir={out}"], "has no config.yaml artifact"),
        ([f"resume={run_id}", f"out_dir={out}", "train.lr=0.1"], "refuses 'train.lr'"),
        ([f"resume={run_id}", f"out_dir={out}", "train.max_steps=32"], "to train longer, start a new run"),
        ([f"resume={run_id}", f"out_dir={out}", "train.resume_from=/tmp/step_00000004.pt"], "chooses its own checkpoint"),
        ([f"reproduce={run_id}", f"out_dir={out}", "train.resume_from=/tmp/step_00000004.pt"], "chooses its own checkpoint"),
        ([f"resume={run_id}", f"out_dir={root / 'elsewhere'}"], "no MLflow store at"),
    ]:
        with pytest.raises(UserError, match=message) as err:
            resume_or_reproduce(args)
        assert "\n" not in str(err.value)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(UserError, match="127.0.0.1:9 is unreachable") as err:
        resume_or_reproduce([f"resume={run_id}"])
    assert "\n" not in str(err.value) and time.monotonic() - started < 10


WRITER = """
import sys, torch
from research.checkpoint import checkpoint_path, save_checkpoint
save_checkpoint({"state": {"step": 1}}, checkpoint_path(sys.argv[1], 1))
print("saved", flush=True)
save_checkpoint({"state": {"step": 2}, "big": torch.ones(64 * 2**20)}, checkpoint_path(sys.argv[1], 2))
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.monotonic() + 60
    while not (partial := [p for p in tmp_path.glob(".step_00000002.pt.tmp-*") if p.stat().st_size > 0]):
        assert proc.poll() is None and time.monotonic() < deadline, "the write ended before it could be killed"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert partial[0].exists() and not (tmp_path / "step_00000002.pt").exists()
    assert list_checkpoints(tmp_path) == [tmp_path / "step_00000001.pt"]
    assert load_checkpoint(tmp_path / "step_00000001.pt")["state"]["step"] == 1
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(partial[0])
    prune_checkpoints(tmp_path, keep=2)
    assert not partial[0].exists() and list_checkpoints(tmp_path) == [tmp_path / "step_00000001.pt"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resuming_from_a_middle_checkpoint_is_bitwise_identical(root, tmp_path, precision):
    tiny = {**RUN, "model.num_hidden_layers": 1, "data.seq_len": 8, "train.max_steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3,
            "train.keep_checkpoints": 0, "train.precision": precision, "tracking.enabled": False,
            "out_dir": str(tmp_path), "data.cache_dir": str(root / "cache"), "data.path": str(root / "data.jsonl")}
    whole = train(registry.build("baseline", {**tiny, "train.checkpoint_dir": str(tmp_path / "whole")}))
    resumed = train(registry.build("baseline", {**tiny, "train.checkpoint_dir": str(tmp_path / "resumed"),
                                                "train.resume_from": str(tmp_path / "whole" / "step_00000003.pt")}))
    assert resumed.curve() == [(s, v) for s, v in whole.curve() if s > 3] and len(resumed.curve()) == 3
    assert resumed.curve("val/loss") == [(6, whole.final_val_loss)]
    a = load_checkpoint(tmp_path / "whole" / "step_00000006.pt")["state"]
    b = load_checkpoint(tmp_path / "resumed" / "step_00000006.pt")["state"]
    assert_same_weights(a["model"], b["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    assert a["rng"][0]["torch"].equal(b["rng"][0]["torch"]) and a["data"] == b["data"]
