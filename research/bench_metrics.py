"""The benchmark's metric names in MLflow, and the slugs that file and metric names are made of.

    bench/ours_vs_plain_llama, bench/ours_vs_tuned_llama     the headline: ours ÷ each reference, within its phase
    bench/<phase>/<candidate>/<figure>                      every candidate in every phase (figure: step_s, useful_tokens_per_sec,
                                                            vs_plain_llama, vs_tuned_llama, mfu_measured, ...)
    bench/load_<kind>/<candidate>/step_s | slowdown          beside each background load
    bench/matmul_<precision>_tflops, bench/tracking_share

With several variants in one run, `bench` becomes `bench/<variant label>`.
"""

from __future__ import annotations

import re

from research.bench_report import headline, load_rows, rows
from research.bench_timing import BenchResult


FIGURES = ("step_s", "tokens_per_sec", "useful_tokens_per_sec", "mfu_measured", "peak_mib", "data_wait_share")


def slug(text: str, separator: str = "_") -> str:
    """'AMD EPYC, 2 threads' -> 'amd_epyc_2_threads': for file and metric names."""
    return re.sub(r"[^a-z0-9]+", separator, text.lower()).strip(separator)


def load_kind(phase: str) -> str:
    """'beside spinners: 2 processes' -> 'spinners'."""
    return phase.removeprefix("beside").strip().split(":")[0]


def metrics_of(result: BenchResult, prefix: str = "bench") -> dict[str, float]:
    """Flat {name: value} of every figure in the result, for MLflow."""
    out = {f"{prefix}/matmul_{p}_tflops": flops / 1e12 for p, (flops, _) in result.matmul_flops.items()}
    if result.tracking_share == result.tracking_share:  # not NaN: timed in this variant
        out[f"{prefix}/tracking_share"] = result.tracking_share
    for h in headline(result):
        out[f"{prefix}/ours_vs_{slug(h['reference'])}"] = h["ratio"]
    for phase in result.phases:
        for r in rows(result, phase.name):
            key = f"{prefix}/{slug(phase.name)}/{slug(r['candidate'])}"
            out.update({f"{key}/{name}": r[name] for name in FIGURES if r[name] == r[name]})  # not NaN
            out.update({f"{key}/vs_{slug(label)}": ratio for label, ratio in r["vs"].items()})
    for r in load_rows(result):
        for phase, figures in r["loads"].items():
            key = f"{prefix}/load_{load_kind(phase)}/{slug(r['candidate'])}"
            out[f"{key}/step_s"], out[f"{key}/slowdown"] = figures["step_s"], figures["slowdown"]
    return out
