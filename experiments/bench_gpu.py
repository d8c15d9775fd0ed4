"""The benchmark on a CUDA GPU: bf16, and fp16 with the gradient scaler, at ~25M and ~100M parameters.

One command, on any machine with a CUDA GPU (an H200 or otherwise); it writes
results/bench/<gpu name>.md and logs the figures to MLflow:

    python run.py exp=bench_gpu
    python run.py exp=bench_gpu bench.out=/somewhere/else   # the report elsewhere

Our step runs compiled (train.compile=auto compiles on CUDA); transformers' Llama runs plain
(eager, torch's AdamW) and tuned (torch.compile, fused AdamW), all in one phase: on a GPU there is
no allocator or OpenMP setting to tell them apart. At the 100M bf16 shape, where the MFU target is
judged, our step is also timed eager.
Batches are larger than the CPU recipe's so that a step is not dominated by kernel launches.
"""

BASE = "bench"

OVERRIDES = {
    "train.device": "cuda",
    "train.batch_size": 32,  # 16k tokens per step at seq 512
    "bench.steps": 20,
    "bench.warmup_steps": 5,
    "bench.padded": False,  # padding costs the same on any device; the CPU report has it
    "bench.load": [],  # background load is a CPU question
    "bench.compile": False,  # our step only as train.compile picks (compiled): fewer compiles keep the run short
}

SHAPE_100M = {  # 106M parameters: hidden 768, 16 layers, 12 heads / 4 kv
    "model.hidden_size": 768,
    "model.num_hidden_layers": 16,
    "model.num_attention_heads": 12,
    "model.num_key_value_heads": 4,
    "model.intermediate_size": 2048,
    "data.seq_len": 1024,
    "train.batch_size": 16,
}

VARIANTS = [
    ("minimind2-small 25.8M, bf16", {"train.precision": "bf16"}),
    ("minimind2-small 25.8M, fp16 + GradScaler", {"train.precision": "fp16"}),
    ("106M, bf16", {**SHAPE_100M, "train.precision": "bf16", "bench.compile": True}),
    ("106M, fp16 + GradScaler", {**SHAPE_100M, "train.precision": "fp16"}),
]


def main(cfg):
    import torch

    from research.benchmark import run_bench
    from research.errors import UserError

    if not torch.cuda.is_available():
        raise UserError("exp=bench_gpu needs a CUDA GPU (torch sees none); on a CPU run python run.py exp=bench")
    return run_bench(cfg, VARIANTS)
