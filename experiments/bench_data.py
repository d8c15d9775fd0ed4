"""Token cache build speed on a generated ~1 GB sharded corpus: 1 worker, every core, and a plain tokenizer pass.

Writes results/bench/data-<machine>.md. About 12 minutes on 2 CPU cores (the single-threaded
tokenizer pass and the one-worker build take ~5 minutes each); the corpus is generated once
under the system temp folder and reused:

    python run.py exp=bench_data                                      # 1 GB in 20 shards
    python run.py exp=bench_data bench.data_mb=200 bench.data_shards=4  # 4 shards of 50 MB
    python run.py exp=bench_data bench.data_mb=20 bench.data_shards=2   # a quick look
"""

OVERRIDES = {"tracking.enabled": False}


def main(cfg):
    from research.data_bench import run_data_bench

    return run_data_bench(cfg)
