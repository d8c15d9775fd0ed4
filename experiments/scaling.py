"""Scaling study: 5 model shapes x 3 compute budgets, IsoFLOP and parametric fits, and a 4x larger held-out budget predicted before it trains.

Each (shape, budget) cell is a trial of one Optuna study (queue, workers, retries, resume: research/sweep.py);
research/scaling.py holds the flow, research/scaling_fit.py the fits, docs/scaling.md the method.
A cell of budget C trains C / FLOPs per token tokens (accounting.flops_per_token). The lr of each
size follows one rule, train.lr x sqrt(192 / width): the baseline's tuned 2e-3 at its width 192,
higher for narrower models (between standard parametrisation, one lr for all, and muP's 1 / width).

    python run.py exp=scaling sweep.report_dir=results/scaling train.threads=1   # the committed study: started twice, two workers
    python run.py exp=scaling scaling.seeds=2 sweep.study_name=scaling-2seeds     # two seeds per cell, as a new study

The committed study took 24 minutes on 2 busy CPU cores (results/scaling.md).
"""

OVERRIDES = {
    "scaling.sizes": ["32x1", "32x2", "32x4", "64x2", "64x4"],  # 15k to 197k non-embedding parameters (12.8x)
    "scaling.budgets": [5e11, 1e12, 2e12],  # FLOPs per fitted cell: 55 to 688 steps
    "scaling.holdout_factor": 4.0,  # held-out budget 8e12 FLOPs
    "scaling.holdout_sizes": ["32x3", "32x6", "32x8"],  # more shapes near the optimum the held-out run may pick
    "scaling.holdout_seeds": 2,
    "data.seq_len": 256,
    "train.batch_size": 8,  # 2,048 tokens per step, as the baseline
    "train.lr": 2e-3,  # at scaling.lr_width = 192
    "train.min_lr_ratio": 0.1,  # cosine to lr/10: every cell's schedule ends at its own budget
    "train.eval_every": 0,  # validation only at the end: the fits read the test loss
    "train.sample_tokens": 0,
    "sweep.heartbeat_s": 10,
    "sweep.grace_s": 60,  # a killed worker's cell is queued again a minute after its last heartbeat
}


def main(cfg):
    from research.scaling import run_scaling  # torch and Optuna only when the study runs: `run.py list` stays fast

    return run_scaling(cfg)
