"""Coordinate check: mean |activation| per layer over the first 5 steps at widths 64-512, SP and μP (results/coord_check/).

Each width trains 5 steps at a constant lr of 1e-2 (high enough that SP's growth shows within them)
from model.base_width 64, three seeds each; the plot, the numbers and the slopes go to results/coord_check/ and to an MLflow run.

    python run.py exp=coord_check          # under 2 minutes, on one thread of a busy 2-core machine
"""

from pathlib import Path

from research.config import resolve_path

BASE = "baseline"

OVERRIDES = {
    "model.base_width": 64,
    "train.lr": 1e-2,
    "train.sample_tokens": 0,
    "train.threads": 1,  # a few steps of small models: one thread wastes less on a busy machine
}

WIDTHS = [64, 128, 256, 512]  # hidden sizes; 4 heads each, so d_head = width / 4
SEEDS = 3  # averaged: one seed's batch moves a width's point
STEPS = 5  # steps recorded
OUT = "results/coord_check"


def main(cfg):
    from research.coord_check import log_to_mlflow, measure, write_report

    result = measure(cfg, WIDTHS, SEEDS, STEPS)
    files = write_report(result, resolve_path(OUT))
    run_id = log_to_mlflow(cfg, result, files) if cfg.tracking.enabled else None
    print(f"coordinate check written to {Path(OUT) / 'coord_check.md'}" + (f"; MLflow run {run_id}" if run_id else ""))
    return result
