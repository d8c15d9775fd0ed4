"""The throughput benchmark: its candidates do equal work, its ratios are taken within one phase, its rounds interleave.

Real runs at a tiny shape (their figures are not asserted, only their sense), and synthetic timings
where a figure's value is the point.
"""

import multiprocessing
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from research import background_load, distributed, hardware, registry
from research.bench_candidates import PLAIN_LLAMA, TUNED_LLAMA, build_candidates
from research.bench_metrics import metrics_of
from research.bench_phases import PLAIN, plain_environment, time_plain_phase
from research.bench_report import headline, load_rows, markdown, precision_line, rows
from research.bench_timing import BenchResult, Candidate, Phase, Ticker, Timing, time_phase
from research.errors import UserError
from research.hardware import resolve_compile, resolve_precision
from research.step import StepDone
from research.tracking import tracking_uri
from research.trainer import train
from conftest import TINY, run_cli


def bench_cfg(tmp_path, token_cache, **overrides):
    shape = {k: v for k, v in TINY.items() if k.startswith(("model.", "data."))}
    values = {**shape, "model.intermediate_size": 0, "train.batch_size": 4, "train.precision": "fp32", "bench.steps": 2, "bench.warmup_steps": 1,
              "bench.compile": False, "bench.profile": False, "out_dir": str(tmp_path / "results"), "bench.out": str(tmp_path / "bench"),
              "bench.machine": "test-machine", "data.cache_dir": token_cache, "bench.load": []}
    values.update(overrides)
    return registry.build("bench", values)


def cpu_flags_read_here() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# ---------------------------------------------------------------- equal work


def test_ours_and_both_llamas_do_equal_work(tmp_path, token_cache):
    """Same tokens, the same matmul FLOPs (counted by torch, not by our formula) and the same AdamW settings per step."""
    cfg = bench_cfg(tmp_path, token_cache, **{"train.grad_accum": 2, "bench.padded": False})
    candidates, _ = build_candidates(cfg, distributed.setup("cpu"))
    by_name = {c.name: c for c in candidates}
    assert set(by_name) == {"ours", PLAIN_LLAMA, TUNED_LLAMA}
    counted = {}
    for c in candidates:
        with warnings.catch_warnings(), FlopCounterMode(display=False) as flops:
            warnings.simplefilter("ignore")  # torch.compile warns that the counter's module hooks fire twice
            done = c.step()
        counted[c.name] = flops.get_total_flops()
        assert done.tokens == 4 * 64 * 2, c.name  # batch x seq x accumulation, from the config above
    assert counted["ours"] > 0 and counted[PLAIN_LLAMA] == counted["ours"] and counted[TUNED_LLAMA] == counted["ours"], counted
    assert by_name["ours"].last.targets == 4 * 64 * 2  # packed windows: every position has a target
    assert by_name[PLAIN_LLAMA].last.targets == 4 * 63 * 2  # Llama shifts its labels inside: one target fewer per row

    def settings(c):
        return [({k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}, sum(p.numel() for p in g["params"]))
                for g in c.runner.state.optimizer.param_groups]

    ours = settings(by_name["ours"])
    assert [s["lr"] for s, _ in ours] == [cfg.train.lr] * 2 and ours[0][0]["betas"] == (cfg.train.beta1, cfg.train.beta2)
    assert [s["weight_decay"] for s, _ in ours] == [cfg.train.weight_decay, 0.0]  # matrices decay, norms do not
    assert settings(by_name[PLAIN_LLAMA]) == ours and settings(by_name[TUNED_LLAMA]) == ours
    assert {c.lr for c in candidates} == {cfg.train.lr}
    defaults = {name: c.runner.state.optimizer.defaults for name, c in by_name.items()}
    assert defaults["ours"]["fused"] and defaults[TUNED_LLAMA]["fused"]  # the tuned reference fuses AdamW as ours does
    assert not defaults[PLAIN_LLAMA]["fused"] and defaults[PLAIN_LLAMA]["foreach"] is None  # the plain script asks for nothing
    assert isinstance(by_name[TUNED_LLAMA].runner.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(by_name[PLAIN_LLAMA].runner.forward_model, torch._dynamo.eval_frame.OptimizedModule)


# ---------------------------------------------------------------- the harness, on synthetic candidates


class FakeRunner:
    """A step driver that only records when it ran."""

    def __init__(self, name, log, tokens=100, targets=100):
        self.name, self.log, self.tokens, self.targets = name, log, tokens, targets
        self.state = SimpleNamespace(model=torch.nn.Linear(2, 2), optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))

    def advance(self, lr):
        self.log.append(self.name)
        return StepDone(torch.tensor(1.0), torch.tensor(1.0), self.tokens, self.targets, 0.0)


def test_rounds_interleave_and_warm_up_rounds_are_dropped():
    log = []
    candidates = [Candidate(name, FakeRunner(name, log), 1e-3, {}) for name in "abc"]
    rounds_seen = []
    time_phase(candidates, "phase", warmup=2, steps=3, device=torch.device("cpu"), ticker=Ticker(), between_rounds=rounds_seen.append)
    assert log == list("abc") * 5 and rounds_seen == [0, 1, 2, 3, 4]
    assert all(len(c.timings["phase"].seconds) == 3 for c in candidates)


def synthetic_result(seconds: dict[tuple[str, str], float]) -> BenchResult:
    """A result whose (candidate, phase) step times are given; every step carries 100 tokens, all with loss."""
    phases = [PLAIN, Phase("our settings", "freed memory kept for reuse", "GOMP_SPINCOUNT=20000")]
    knobs = {"ours": {"torch.compile": "each block", "AdamW": "fused"}, PLAIN_LLAMA: {"torch.compile": "no", "AdamW": "for-loop (torch's default)"},
             TUNED_LLAMA: {"torch.compile": "whole model", "AdamW": "fused"}}
    candidates = {name: Candidate(name, FakeRunner(name, []), 1e-3, knobs[name]) for name in knobs}
    for (name, phase), s in seconds.items():
        candidates[name].timings[phase] = Timing(seconds=[s], tokens=[100], useful=[100], data_wait=[0.0], page_faults=[0])
    shape = {"parameters": 1_000_000, "vocab": 256, "hidden": 64, "layers": 2, "heads": 4, "kv heads": 2, "intermediate": 192, "seq": 64,
             "batch": 4, "grad accum": 1, "precision": "fp32"}
    return BenchResult(label="test", device="cpu", device_type="cpu", shape=shape, candidates=list(candidates.values()),
                       phases=phases, load_phases=[], references={"plain Llama": (PLAIN_LLAMA, "plain settings"), "tuned Llama": (TUNED_LLAMA, "our settings")},
                       matmul_flops={"fp32": (1e12, 1024)}, table_peak_flops=1e12, tracking_share=float("nan"), tracking_ms_per_flush=float("nan"),
                       flops_per_token=1e6, rounds=1)


def test_every_ratio_is_taken_within_one_phase():
    # ours is 3x plain Llama under plain settings and half as fast as tuned Llama under ours; ours under our
    # settings against plain Llama under plain settings (4.8x) divides across phases and must appear nowhere
    result = synthetic_result({("ours", "plain settings"): 2.0, (PLAIN_LLAMA, "plain settings"): 6.0,
                               ("ours", "our settings"): 1.25, (PLAIN_LLAMA, "our settings"): 2.5, (TUNED_LLAMA, "our settings"): 0.625})
    assert {h["reference"]: (h["phase"], h["ratio"]) for h in headline(result)} == {"plain Llama": ("plain settings", 3.0), "tuned Llama": ("our settings", 0.5)}
    assert {r["candidate"]: r["vs"] for r in rows(result, "plain settings")} == {"ours": {"plain Llama": 3.0}, PLAIN_LLAMA: {"plain Llama": 1.0}}
    assert {r["candidate"]: r["vs"] for r in rows(result)} == {"ours": {"tuned Llama": 0.5}, PLAIN_LLAMA: {"tuned Llama": 0.25}, TUNED_LLAMA: {"tuned Llama": 1.0}}
    metrics = metrics_of(result)
    assert metrics["bench/ours_vs_plain_llama"] == 3.0 and metrics["bench/ours_vs_tuned_llama"] == 0.5
    assert not [name for name, value in metrics.items() if "vs_" in name and value == pytest.approx(4.8)]
    report = markdown([result], "python run.py exp=bench")
    assert "| plain Llama | plain settings | 2.000 | 6.000 | 3.00× | torch.compile: each block vs no; AdamW: fused vs for-loop (torch's default) |" in report
    assert "| tuned Llama | our settings | 1.250 | 0.625 | 0.50× | none: the margin is the model code |" in report
    assert "4.80" not in report
    assert "torch.compile and fused AdamW on Llama: 4.00×" in report  # tuned against the plain script's code, both under our settings


def test_a_missing_reference_leaves_its_ratios_out():
    result = synthetic_result({("ours", "our settings"): 1.0, (TUNED_LLAMA, "our settings"): 2.0})
    result.phases, result.references = result.phases[1:], {"tuned Llama": (TUNED_LLAMA, "our settings")}
    assert [(h["reference"], h["ratio"]) for h in headline(result)] == [("tuned Llama", 2.0)]
    assert "| plain Llama |" not in markdown([result], "python run.py exp=bench")


def test_the_report_says_when_other_work_shared_the_cores():
    result = synthetic_result({("ours", "our settings"): 1.0, (TUNED_LLAMA, "our settings"): 2.0})
    result.cores, result.load_average = 2, {"our settings": (1.8, 2.4)}
    report = markdown([result], "python run.py exp=bench")
    assert "load average 1.8 → 2.4" in report and "Other work shared the machine" not in report
    result.load_average = {"our settings": (7.5, 12.3)}
    assert "the 1-minute load average reached 12.3 on 2 cores" in markdown([result], "python run.py exp=bench")


# ---------------------------------------------------------------- a real run at a tiny shape


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, token_cache):
    """One benchmark at a tiny shape: plain phase, our settings, beside the training load, logged to MLflow."""
    tmp_path = tmp_path_factory.mktemp("bench")
    cfg = bench_cfg(tmp_path, token_cache, **{"bench.load": ["training"]})
    [result] = run_bench_quietly(cfg)
    return cfg, result, (tmp_path / "bench" / "test-machine.md").read_text()


def run_bench_quietly(cfg):
    from research.benchmark import run_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_bench(cfg)


def test_the_run_times_each_reference_in_its_own_phase(tiny_bench):
    _, result, report = tiny_bench
    assert [p.name for p in result.phases] == ["plain settings", "our settings"]
    assert {r["candidate"] for r in rows(result, "plain settings")} == {"ours", PLAIN_LLAMA}
    assert {r["candidate"] for r in rows(result)} == {"ours", "ours, a document per row (data.packing=false)", PLAIN_LLAMA, TUNED_LLAMA}
    assert {h["reference"]: h["phase"] for h in headline(result)} == {"plain Llama": "plain settings", "tuned Llama": "our settings"}
    assert set(result.load_average) == {p.name for p in result.phases + result.load_phases}
    # the plain phase really ran under glibc's defaults: its steps page-fault freed memory back in, ours reuse it
    faults = {p.name: result.candidates[0].timings[p.name].page_faults for p in result.phases}
    assert min(faults["plain settings"]) > max(faults["our settings"]), faults
    assert "| plain Llama | plain settings |" in report and "| tuned Llama | our settings |" in report


def test_mfu_is_at_most_one_and_the_figures_make_sense(tiny_bench):
    _, result, _ = tiny_bench
    for phase in result.phases:
        for r in rows(result, phase.name):
            assert 0 < r["mfu_measured"] <= 1 and 0 < r["mfu_table"] <= 1, r
            assert r["step_s"] > 0 and 0 <= r["data_wait_share"] < 1 and r["peak_mib"] > 0, r
    assert result.matmul_flops["fp32"][0] > 1e9 and 0 <= result.tracking_share < 1


def test_the_training_load_runs_beside_ours_and_the_llamas(tiny_bench):
    _, result, report = tiny_bench
    assert [p.name for p in result.load_phases] == ["beside training: 1 process"]
    assert {r["candidate"] for r in load_rows(result)} == {"ours", PLAIN_LLAMA, TUNED_LLAMA}
    assert not any(p.name != "MainProcess" for p in multiprocessing.active_children())  # the load and the plain phase's process ended
    assert "**Beside background load**" in report


def test_the_report_and_the_mlflow_run(tiny_bench):
    cfg, result, report = tiny_bench
    flags = cpu_flags_read_here()
    assert f"AMX {'yes' if 'amx_bf16' in flags else 'no'}" in report
    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.info.status == "FINISHED"
    for h in headline(result):
        assert run.data.metrics[f"bench/ours_vs_{h['reference'].replace(' ', '_').lower()}"] == pytest.approx(h["ratio"])
    assert not [name for name in run.data.metrics if name.endswith("vs_llama")]  # no ratio named without its reference
    assert client.get_metric_history(run.info.run_id, "train/loss")  # our steps were logged like a training run's
    assert "bench/test-machine.md" in {a.path for a in client.list_artifacts(run.info.run_id, "bench")}


# ---------------------------------------------------------------- settings and failures


def test_the_plain_phase_starts_without_our_openmp_setting(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with plain_environment():
        assert os.environ["GOMP_SPINCOUNT"] == "300000" and "OMP_WAIT_POLICY" not in os.environ  # libgomp's default spin count
    assert os.environ["GOMP_SPINCOUNT"] == "20000" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_plain_phase_that_fails_is_one_clear_error(tmp_path, token_cache):
    cfg = bench_cfg(tmp_path, token_cache, **{"data.path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(UserError, match="the plain-settings phase failed: UserError"):
        time_plain_phase(cfg, Ticker())
    assert not multiprocessing.active_children()


def test_a_training_load_that_cannot_start_is_one_clear_error(tmp_path, token_cache):
    cfg = bench_cfg(tmp_path, token_cache, **{"data.path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(UserError, match="the training load stopped before its first step .*bench.load=\\[spinners\\]"):
        with background_load.running("training", cfg):
            pass
    assert not multiprocessing.active_children()


def test_the_report_says_whether_auto_picks_the_faster_precision(monkeypatch):
    def result(precision, seconds):
        r = synthetic_result({("ours", "our settings"): s for s in seconds[:1]})
        r.candidates[0].timings["our settings"] = Timing(seconds=seconds)
        r.shape["precision"] = precision
        return r

    for flags, auto, other in ((frozenset({"avx2", "amx_bf16"}), "bf16", "fp32"), (frozenset({"avx2"}), "fp32", "bf16")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        [line, _] = precision_line([result(auto, [1.0, 1.2, 1.1]), result(other, [2.5, 2.4, 2.6])])
        assert f"picks {auto} here, the faster one for our step: 1.100 s in {auto}, 2.500 s in {other}" in line
        [line, _] = precision_line([result(auto, [3.0]), result(other, [2.0])])
        assert "NOT the faster" in line
    assert precision_line([result("fp32", [1.0])]) == []


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    for flags, expected in ((frozenset({"avx2"}), "fp32"), (frozenset({"avx512_bf16"}), "bf16"), (frozenset({"amx_bf16"}), "bf16")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert resolve_precision("auto", cpu) == expected
    monkeypatch.undo()
    flags = cpu_flags_read_here()
    assert resolve_precision("auto", cpu) == ("bf16" if {"amx_bf16", "avx512_bf16"} & flags else "fp32")


def test_compile_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for can_build in (True, False):
        monkeypatch.setattr(hardware, "can_compile_cpu_kernels", lambda can_build=can_build: can_build)
        assert resolve_compile("auto", cpu, 3_000_000) is False  # small models: compiling costs more than it saves on a CPU
        assert resolve_compile("auto", cpu, 26_000_000) is can_build  # large ones compile where g++ and the Python headers are
    assert resolve_compile("auto", cuda, 3_000_000) is True
    assert resolve_compile("True", cpu, 1) is True and resolve_compile("false", cuda, 10**9) is False
    result = run_cli("train.compile=maybe")
    assert result.returncode == 2 and "train.compile must be auto, true or false" in result.stderr


def test_compiled_training_matches_eager(tiny_cfg):
    eager = train(tiny_cfg(tracking__enabled=False, train__max_steps=3, train__sample_tokens=0, train__compile="false"))
    compiled = train(tiny_cfg(tracking__enabled=False, train__max_steps=3, train__sample_tokens=0, train__compile="true"))
    assert "torch.compile" in compiled.derived["precision"] and "torch.compile" not in eager.derived["precision"]
    for (_, a), (_, b) in zip(eager.curve(), compiled.curve()):
        assert a == pytest.approx(b, rel=1e-4)  # fused kernels reorder float sums: close, not bitwise
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)


def test_gpu_recipe_says_it_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the recipe would run")
    result = run_cli("exp=bench_gpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: exp=bench_gpu needs a CUDA GPU (torch sees none); on a CPU run python run.py exp=bench"]
