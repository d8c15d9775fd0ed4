"""Throughput side by side at the minimind2-small shape: our step, padded data, plain and tuned Llama, matmul ceiling, background load.

Writes results/bench/<machine>.md and logs every figure to MLflow. On a CPU, ours and plain Llama
(eager, torch's AdamW) are first timed in a fresh process under glibc's allocator and libgomp's
OpenMP defaults; then every candidate, tuned Llama (torch.compile, fused AdamW) included, under our
settings, and ours and the Llamas again beside each background load (bench.load). Every ratio is
taken within one of those phases. The precision train.precision=auto picks runs first; on a CPU
whose auto precision is bf16 (AMX or AVX-512 BF16), fp32 follows, without the loads.

    python run.py exp=bench                                     # the full comparison
    python run.py exp=bench train.precision=fp32                # one precision only
    python run.py exp=bench bench.load=[] bench.compile=false   # quicker: alone, our step only as train.compile picks
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
