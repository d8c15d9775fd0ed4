"""What the hardware can do: which precision runs fast, and its peak FLOP/s for MFU.

bf16 only pays on CPUs with AMX or AVX-512 BF16; on others (plain AVX2) bf16 matrix
products are emulated and run ~100x slower than fp32, so `precision=auto` picks fp32.
"""

from __future__ import annotations

import json
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

from research.errors import UserError

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, by substring of the device name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into fp32/bf16 and refuse combinations that cannot run."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Median FLOP/s of a square matmul: the ceiling MFU is measured against on CPUs."""
    generator = torch.Generator(device=device).manual_seed(0)  # its own RNG: measuring must not shift the training RNG
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def peak_flops(device: torch.device, precision: str, cache_dir: Path | None = None) -> float:
    """Peak FLOP/s for MFU: a known table for GPUs, a (cached) measurement for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if precision in ("bf16", "fp16") else flops / 2
    dtype = autocast_dtype(precision) or torch.float32
    key = f"{device_name(device)}|{torch.get_num_threads()}|{dtype}"
    cache = (cache_dir / "peak_flops.json") if cache_dir else None
    known = {}
    if cache and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    if key not in known:
        known[key] = measure_matmul_flops(dtype, device, size=512 if dtype != torch.float32 and not cpu_has_fast_bf16() else 1024)
        if cache:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known, indent=1))
            except OSError:
                pass
    return known[key]
