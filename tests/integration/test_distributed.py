"""Data-parallel training through the real torchrun CLI: 2 CPU ranks (gloo) against one process, same global batch."""

import math
import subprocess
import sys

from mlflow.tracking import MlflowClient

from conftest import REPO, TINY
from research.checkpoint import list_checkpoints
from research.trainer import train


def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_cfg, tmp_path, token_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    per_rank = TINY["train.batch_size"] // 2
    settings = {
        **TINY, "out_dir": str(tmp_path / "results"), "data.cache_dir": token_cache, "tracking.uri": uri,
        "train.batch_size": per_rank, "train.threads": 1, "train.sample_tokens": 0, "tracking.log_hf_model": False,
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(REPO / "run.py")]
    proc = subprocess.run(torchrun + [f"{k}={v}" for k, v in settings.items()], cwd=REPO, capture_output=True, text=True, timeout=300)
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
