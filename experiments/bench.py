"""Throughput side by side at the minimind2-small shape: our step, padded data, transformers' Llama, matmul ceiling, background load.

Writes results/bench/<machine>.md and logs every figure to MLflow. The precision train.precision=auto
picks runs first, with our step and Llama's timed again beside each background load (bench.load);
on a CPU whose auto precision is bf16 (AMX or AVX-512 BF16), fp32 follows, without the loads.
About 10 minutes on 2 CPU cores with AMX (bf16 with the loads, then fp32), 15 on an AVX2 CPU (fp32 only, steps of ~6 s):

    python run.py exp=bench                                     # the full comparison
    python run.py exp=bench train.precision=fp32                # one precision only
    python run.py exp=bench bench.load=[] bench.compile=false   # quicker: alone, eager
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
    from research.distributed import pick_device
    from research.hardware import resolve_precision

    variants = [("", {})]
    device = pick_device(cfg.train.device)
    if device.type == "cpu" and cfg.train.precision == "auto" and resolve_precision("auto", device) != "fp32":
        variants.append(("", {"train.precision": "fp32", "bench.load": []}))  # what any CPU can run
    return run_bench(cfg, variants)
