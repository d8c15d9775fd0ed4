"""The throughput benchmark and torch.compile: real runs at a tiny shape (figures are not asserted, only their sense)."""

import math
import multiprocessing

import pytest
import torch
from mlflow.tracking import MlflowClient

from research import background_load, registry
from research.errors import UserError
from research.benchmark import BenchResult, Candidate, Timing, load_rows, precision_line, run_bench, rows
from research.hardware import FREED_MEMORY_KEPT, can_compile_cpu_kernels, resolve_compile, resolve_precision
from research.tracking import tracking_uri
from research.trainer import train
from conftest import TINY, run_cli


def bench_cfg(tmp_path, token_cache, **overrides):
    shape = {k: v for k, v in TINY.items() if k.startswith(("model.", "data."))}
    values = {**shape, "model.intermediate_size": 0, "train.batch_size": 4, "bench.steps": 2, "bench.warmup_steps": 1,
              "bench.compile": False, "out_dir": str(tmp_path / "results"), "bench.out": str(tmp_path / "bench"),
              "bench.machine": "test-machine", "data.cache_dir": token_cache, "bench.load": []}
    values.update(overrides)
    return registry.build("bench", values)


def test_bench_compares_candidates_writes_the_report_and_logs_it(tmp_path, token_cache):
    cfg = bench_cfg(tmp_path, token_cache, **{"bench.load": ["spinners", "training"]})
    first_in_process = not FREED_MEMORY_KEPT.is_set()  # an earlier train() in this process set it for good
    [result] = run_bench(cfg)
    table = {r["candidate"]: r for r in rows(result)}
    assert set(table) == {"ours", "ours, a document per row (data.packing=false)", "llama"}
    first = {r["candidate"]: r for r in rows(result, result.phases[0])}
    assert first["llama"]["vs_llama"] == 1.0  # the reference: the plain loop as a script runs it
    for r in table.values():
        assert r["step_s"] > 0 and r["tokens_per_sec"] > 0 and 0 < r["mfu_measured"] < 1.5, r
        assert 0 <= r["data_wait_share"] < 1 and r["peak_mib"] > 0
    packed = table["ours"]
    assert packed["useful_share"] == 1.0  # packed windows: every target carries loss
    assert table["llama"]["useful_share"] == pytest.approx(63 / 64)  # Llama shifts labels inside: one target fewer per row
    assert result.matmul_flops["fp32"][0] > 1e9 and 0 <= result.tracking_share < 1
    # on a CPU: glibc's defaults, then the trainer's allocator setting; that setting lasts for the
    # process, so after an earlier train() in the same process there is no "default" phase to time
    assert len(result.phases) == (2 if first_in_process else 1)
    assert {r["candidate"] for r in rows(result, result.phases[0])} == set(table)

    # beside each background load: our step and the Llama loop, with their slowdowns against the same step alone
    assert [phase.split(":")[0] for phase in result.load_phases] == ["beside spinners", "beside training"]
    loaded = {r["candidate"]: r for r in load_rows(result)}
    assert set(loaded) == {"ours", "llama"}
    for r in loaded.values():
        assert r["alone_s"] == table[r["candidate"]]["step_s"]
        for figures in r["loads"].values():
            lo, hi = figures["step_range"]
            assert lo <= figures["step_s"] <= hi and figures["slowdown"] == pytest.approx(figures["step_s"] / r["alone_s"])
    assert not any(p.name != "MainProcess" for p in multiprocessing.active_children())  # every load process was stopped

    report = (tmp_path / "bench" / "test-machine.md").read_text()
    assert "**Beside background load**" in report and "beside training: 1 process" in report
    assert "AMX yes" in report or "AMX no" in report
    assert "| ours |" in report and "| llama |" in report and "Matmul ceiling" in report
    assert "Profile of one step of **ours**" in report  # torch.profiler's breakdown of our step

    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["bench/load_spinners/ours/slowdown"] == loaded["ours"]["loads"][result.load_phases[0]]["slowdown"]
    assert math.isclose(run.data.metrics["bench/ours/tokens_per_sec"], packed["tokens_per_sec"], rel_tol=1e-9)
    if first_in_process:
        assert run.data.metrics["bench/default_allocator/llama/vs_llama"] == 1.0
        assert "bench/default_allocator/ours/step_s" in run.data.metrics
    else:
        assert run.data.metrics["bench/llama/vs_llama"] == 1.0
    assert client.get_metric_history(run.info.run_id, "train/loss")  # our steps were logged like a training run's
    assert "bench/test-machine.md" in {a.path for a in client.list_artifacts(run.info.run_id, "bench")}


def test_compiled_training_matches_eager(tiny_cfg):
    eager = train(tiny_cfg(tracking__enabled=False, train__max_steps=3, train__sample_tokens=0, train__compile="false"))
    compiled = train(tiny_cfg(tracking__enabled=False, train__max_steps=3, train__sample_tokens=0, train__compile="true"))
    assert "torch.compile" in compiled.derived["precision"] and "torch.compile" not in eager.derived["precision"]
    for (_, a), (_, b) in zip(eager.curve(), compiled.curve()):
        assert a == pytest.approx(b, rel=1e-4)  # fused kernels reorder float sums: close, not bitwise
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu, 3_000_000) is False  # small models: compiling costs more than it saves on a CPU
    assert resolve_compile("auto", cpu, 26_000_000) is can_compile_cpu_kernels()
    assert resolve_compile("auto", cuda, 3_000_000) is True
    assert resolve_compile("True", cpu, 1) is True and resolve_compile("false", cuda, 10**9) is False
    result = run_cli("train.compile=maybe")
    assert result.returncode == 2 and "train.compile must be auto, true or false" in result.stderr


def test_gpu_recipe_says_it_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the recipe would run")
    result = run_cli("exp=bench_gpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: exp=bench_gpu needs a CUDA GPU (torch sees none); on a CPU run python run.py exp=bench"]


def test_the_report_says_whether_auto_picks_the_faster_precision():
    def result(precision, seconds):
        ours = Candidate("ours", precision, step=lambda: (0, 0, 0.0), static_bytes_of=lambda: 0, timings={"alone": Timing(seconds=seconds)})
        return BenchResult(label="", device="cpu", device_type="cpu", shape={"precision": precision}, candidates=[ours], phases=["alone"],
                           load_phases=[], matmul_flops={}, table_peak_flops=1.0, tracking_share=0.0, tracking_ms_per_flush=0.0,
                           flops_per_token=1.0, rounds=len(seconds))

    auto = resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if auto == "bf16" else "bf16"
    [line, _] = precision_line([result(auto, [1.0, 1.2, 1.1]), result(other, [2.5, 2.4, 2.6])])
    assert f"picks {auto} here, the faster one for our step: 1.100 s in {auto}, 2.500 s in {other}" in line
    [line, _] = precision_line([result(auto, [3.0]), result(other, [2.0])])
    assert "NOT the faster" in line
    assert precision_line([result(auto, [1.0])]) == []


def test_a_training_load_that_cannot_start_is_one_clear_error(tmp_path, token_cache):
    cfg = bench_cfg(tmp_path, token_cache, **{"data.path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(UserError, match="the training load stopped before its first step .*bench.load=\\[spinners\\]"):
        with background_load.running("training", cfg):
            pass
    assert not multiprocessing.active_children()
