"""Data-parallel training through the real torchrun CLI: 2 CPU ranks (gloo) against one process, same global batch."""

import math
import os
import re
import shutil
import subprocess
import sys
import time

import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, run_cli
from research.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from research.trainer import train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(REPO / "run.py")]


def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_cfg, tmp_path, token_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    per_rank = TINY["train.batch_size"] // 2
    settings = {
        **TINY, "out_dir": str(tmp_path / "results"), "data.cache_dir": token_cache, "tracking.uri": uri,
        "train.batch_size": per_rank, "train.threads": 1, "train.sample_tokens": 0, "tracking.log_hf_model": False,
    }
    proc = subprocess.run(TORCHRUN + [f"{k}={v}" for k, v in settings.items()], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1  # one report, from rank 0

    # one process, twice the micro-batch: the same tokens per optimizer step (packing on, so every mask is full)
    single = train(tiny_cfg(tracking__enabled=False, train__sample_tokens=0))
    assert single.tokens_seen == 2 * per_rank * TINY["data.seq_len"] * TINY["train.max_steps"]

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "rank 1 must not open a run of its own"
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"

    for name in ("train/loss", "val/loss"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        expected = single.curve(name)
        assert [s for s, _ in logged] == [s for s, _ in expected], name
        for (step, got), (_, want) in zip(logged, expected):
            assert math.isclose(got, want, rel_tol=1e-4), f"{name} at step {step}: 2 ranks {got} vs 1 process {want}"

    checkpoints = list_checkpoints(tmp_path / "results" / "checkpoints" / run_id)  # rank 0 chose the folder from its run id
    assert [p.name for p in checkpoints] == [f"step_{TINY['train.max_steps']:08d}.pt"]


def test_a_sweep_under_torchrun_is_refused_in_one_line(tmp_path, token_cache):
    proc = subprocess.run(TORCHRUN + ["exp=lr_sweep", "sweep.n_trials=2", f"out_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "cannot run under torchrun (2 ranks)" in errors[0] and "single-process workers" in errors[0]  # one per rank
    assert not (tmp_path / "results" / "optuna.db").exists()  # refused before any study or trial was opened


def test_a_two_rank_run_resumed_in_one_process_keeps_its_tokens_per_step(tmp_path, token_cache):
    uri, out_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results"
    settings = {**TINY, "out_dir": str(out_dir), "data.cache_dir": token_cache, "tracking.uri": uri, "train.batch_size": TINY["train.batch_size"] // 2,
                "train.threads": 1, "train.sample_tokens": 0, "tracking.log_hf_model": False, "train.checkpoint_every": 4}
    proc = subprocess.run(TORCHRUN + [f"{k}={v}" for k, v in settings.items()], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tokens_per_step = TINY["train.batch_size"] * TINY["data.seq_len"]
    assert run.data.params["tokens_per_step"] == str(tokens_per_step) and run.data.tags["world_size"] == "2"

    # as if the 2-rank job had been killed after step 8: its last checkpoint moved aside, the run left unfinished
    folder = out_dir / "checkpoints" / run.info.run_id
    final = checkpoint_path(folder, TINY["train.max_steps"])
    shutil.move(final, tmp_path / "two_ranks_final.pt")
    client.set_terminated(run.info.run_id, status="KILLED")

    proc = run_cli(f"resume={run.info.run_id}", f"tracking.uri={uri}", f"out_dir={out_dir}", f"data.cache_dir={token_cache}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"trained on 2 rank(s); on 1 it keeps its {tokens_per_step:,} tokens per step with train.grad_accum=2 (was 1)" in proc.stdout
    resumed, original = load_checkpoint(final)["state"], load_checkpoint(tmp_path / "two_ranks_final.pt")["state"]
    assert resumed["tokens_seen"] == original["tokens_seen"] and resumed["data"] == original["data"]  # same batches, same sampler position
    for name, weight in original["model"].items():
        assert torch.allclose(resumed["model"][name], weight, atol=1e-5), name  # DDP's all-reduce vs local accumulation: summation order only
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "1" and run.data.tags["resume.train.grad_accum"] == "2"


def test_a_two_rank_run_with_dropout_resumed_from_a_checkpoint_is_bitwise_identical(tmp_path, token_cache):
    """Each rank draws its own dropout masks; a checkpoint keeps every rank's RNG state, so a 2-rank resume equals the run it left."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "out_dir": str(tmp_path / "results"), "data.cache_dir": token_cache, "tracking.uri": uri, "model.dropout": 0.1,
                "train.batch_size": TINY["train.batch_size"] // 2, "train.threads": 1, "train.sample_tokens": 0, "tracking.log_hf_model": False,
                "train.checkpoint_every": 4, "train.keep_checkpoints": 0}
    runs = {"whole": {}, "resumed": {"train.resume_from": str(checkpoint_path(tmp_path / "whole", 4))}}
    for name, extra in runs.items():
        args = {**settings, "tracking.run_name": name, "train.checkpoint_dir": str(tmp_path / name), **extra}
        proc = subprocess.run(TORCHRUN + [f"{k}={v}" for k, v in args.items()], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(uri)
    found = {r.info.run_name: r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    losses = {name: {m.step: m.value for m in client.get_metric_history(found[name], "train/loss")} for name in runs}
    assert sorted(losses["resumed"]) == list(range(5, TINY["train.max_steps"] + 1))
    assert losses["resumed"] == {step: loss for step, loss in losses["whole"].items() if step > 4}  # exactly, not within a tolerance

    final = checkpoint_path(tmp_path / "whole", TINY["train.max_steps"]).name
    whole, resumed = (load_checkpoint(tmp_path / name / final)["state"] for name in runs)
    assert whole["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert len(whole["rng"]) == len(resumed["rng"]) == 2  # one state per rank
    assert not torch.equal(whole["rng"][0]["torch"], whole["rng"][1]["torch"])  # the ranks' dropout masks differ
    for rank in range(2):
        assert torch.equal(whole["rng"][rank]["torch"], resumed["rng"][rank]["torch"]), f"rank {rank}"


# Under torchrun, run.py with a process-group timeout of a few seconds and a token-cache build slowed down to last
# several times as long (each block of the corpus waits SLOW_BLOCK_S before it is tokenized): a barrier would time out.
SLOW_BUILD = """
import functools, os, runpy, sys, time
sys.path.insert(0, os.environ["REPO"])
from research import data, distributed, token_cache
distributed.PROCESS_GROUP_TIMEOUT_S = float(os.environ["PG_TIMEOUT_S"])
distributed.WAIT_REPORT_EVERY_S = 1.0
encode = token_cache.Encoder.__call__
def slow_encode(self, *args):
    time.sleep(float(os.environ["SLOW_BLOCK_S"]))
    return encode(self, *args)
token_cache.Encoder.__call__ = slow_encode
data.open_token_cache = functools.partial(token_cache.open_token_cache, block_bytes=8192)
sys.argv = [os.path.join(os.environ["REPO"], "run.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def slow_build_under_torchrun(tmp_path, corpus, pg_timeout_s: float, slow_block_s: float) -> subprocess.CompletedProcess:
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    settings = {**TINY, "out_dir": str(tmp_path / "results"), "data.cache_dir": str(tmp_path / "cache"), "data.path": str(corpus),
                "data.workers": 1, "train.batch_size": 2, "train.max_steps": 2, "train.warmup_steps": 1, "train.eval_every": 0, "train.threads": 1,
                "train.sample_tokens": 0, "tracking.enabled": False}
    command = TORCHRUN[:-1] + [str(script)] + [f"{k}={v}" for k, v in settings.items()]
    env = {**os.environ, "REPO": str(REPO), "PG_TIMEOUT_S": str(pg_timeout_s), "SLOW_BLOCK_S": str(slow_block_s)}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_ranks_wait_for_a_cache_build_longer_than_the_collective_timeout_and_show_its_progress(tmp_path):
    corpus = REPO / "tests" / "data" / "tang_song.jsonl"  # about 15 blocks of 8 KB: 15 s to build
    started = time.monotonic()
    proc = slow_build_under_torchrun(tmp_path, corpus, pg_timeout_s=5, slow_block_s=1.0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started > 15  # the build outlasted the timeout several times over
    waits = [line for line in proc.stdout.splitlines() if line.startswith("rank 1 waits for rank 0, preparing the token cache")]
    assert len(waits) >= 5, proc.stdout
    progress = [re.search(r"tokenizing: [\d.]+ of [\d.]+ MB \((\d+)%\)", line) for line in waits]
    shares = [int(found.group(1)) for found in progress if found]
    assert len(shares) >= 4 and shares == sorted(shares) and shares[-1] > shares[0], waits  # rank 0's progress, moving
    assert proc.stdout.count("token cache built in") == 1  # by rank 0 alone


def test_rank_zero_failing_during_the_build_ends_the_waiting_rank_with_one_line(tmp_path):
    corpus = tmp_path / "data.jsonl"
    lines = (REPO / "tests" / "data" / "tang_song.jsonl").read_text().splitlines()[:40]
    corpus.write_text("\n".join(lines + ["{not json"]) + "\n")
    proc = slow_build_under_torchrun(tmp_path, corpus, pg_timeout_s=600, slow_block_s=2.0)  # a hang would outlast the test's timeout
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr  # rank 0's own, then the waiting rank's, which quotes it
    message = errors[0][len("error: "):]
    assert message.startswith(f"line 41 of {corpus} is not valid JSON") and "data.skip_bad_lines=true" in message
    assert errors[1] == f"error: rank 0 failed while preparing the token cache: {message}"
    assert "interrupted" not in proc.stderr.splitlines()
