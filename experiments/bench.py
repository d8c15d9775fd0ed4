"""Throughput side by side at the minimind2-small shape: our step, padded data, transformers' Llama, matmul ceiling.

Writes results/bench/<machine>.md and logs every figure to MLflow. About 8 minutes on 2 CPU cores
(steps of ~7 s; torch.compile of our model and of Llama take about a minute each):

    python run.py exp=bench                                    # the default comparison
    python run.py exp=bench bench.compile=false bench.steps=3  # quicker: eager only
    python run.py exp=bench train.precision=bf16               # on CPUs with AMX / AVX-512 BF16
"""

# minimind2-small: 25.8M parameters
OVERRIDES = {
    "model.vocab_size": 6400,
    "model.hidden_size": 512,
    "model.num_hidden_layers": 8,
    "model.num_attention_heads": 8,
    "model.num_key_value_heads": 2,
    "model.intermediate_size": 1408,
    "data.seq_len": 512,
    "train.batch_size": 8,
    "train.lr": 5e-4,
}


def main(cfg):
    from research.benchmark import run_bench

    return run_bench(cfg)
