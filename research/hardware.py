"""What the hardware can do: which precision runs fast, and its peak FLOP/s for MFU.

bf16 only pays on CPUs with AMX or AVX-512 BF16; on others (plain AVX2) bf16 matrix
products are emulated and far slower than fp32 (results/measurements.md), so `precision=auto` picks fp32.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import sysconfig
import time
from functools import lru_cache
from pathlib import Path

import torch


# Dense peaks (no sparsity), FLOP/s, by substring of the device name: (bf16/fp16 tensor cores, TF32 tensor cores, plain fp32).
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12, 67e12),
    "H100": (989e12, 494e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10G": (125e12, 62.5e12, 31.2e12),
    "L4": (121e12, 60e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12, 35.6e12),
    "V100": (125e12, 15.7e12, 15.7e12),  # no TF32: fp32 matmuls run on the CUDA cores
    "T4": (65e12, 8.1e12, 8.1e12),
}


COMPILE_MIN_PARAMETERS = 10_000_000  # train.compile=auto compiles CPU runs of models at least this large


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


def cpu_features() -> dict[str, bool]:
    """The instruction sets that decide which precision trains fast on this CPU."""
    flags = cpu_flags()
    return {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags, "AVX-512 BF16": "avx512_bf16" in flags, "AMX": "amx_bf16" in flags}


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
    return precision  # fp16 off CUDA was refused by config.validate


def resolve_compile(setting: str, device: torch.device, parameters: int) -> bool:
    """Turn `train.compile` (auto | true | false) into a yes or no for this model on this device.

    auto: always on CUDA. On a CPU (with g++ and the Python headers, which torch.compile needs there) from
    COMPILE_MIN_PARAMETERS up: compiling the blocks costs seconds at start and fuses the small
    elementwise kernels, which pays at the benchmark's size but not at the baseline's (results/bench/profile.md).
    """
    setting = str(setting).lower()
    if setting != "auto":
        return setting == "true"
    if device.type == "cuda":
        return True
    return parameters >= COMPILE_MIN_PARAMETERS and can_compile_cpu_kernels()


def can_compile_cpu_kernels() -> bool:
    """torch.compile on a CPU builds C++ extensions: it needs g++ and the Python headers."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("g++") is not None and headers.exists()


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, which a container or taskset narrows."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_summary(train_cfg) -> str:
    """Where runs of `train_cfg` train, for a study's report and plots: the device (with threads per run on CPU), torch, the precision."""
    from research.distributed import pick_device

    device = pick_device(train_cfg.device)
    threads = f", {train_cfg.threads or usable_cores()} thread(s) per run" if device.type == "cpu" else ""
    return f"{device_name(device)}{threads}, torch {torch.__version__}, precision {resolve_precision(train_cfg.precision, device)}"


def threading_summary() -> str:
    """How this process's CPU kernels share the cores, for reports."""
    settings = [f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME") if name in os.environ]
    return f"{torch.get_num_threads()} torch threads on {usable_cores()} cores; OpenMP waiting: {', '.join(settings) or 'defaults'}."


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (CPU training).

    A training step allocates and frees the same large activation buffers every time. By default
    glibc serves big requests with mmap and unmaps them on free (and trims the heap's free top), so
    every step page-faults those pages in again (results/bench/profile.md counts the faults and
    their time). The price of keeping them: the process holds its peak memory until it exits. No-op
    where the C library is not glibc.
    """
    libc = glibc()
    if libc is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # big buffers come from the heap, where freed ones are reused
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # and the heap's free top is never handed back (-1: trimming off)


def release_free_memory() -> None:
    """Hand memory freed so far back to the OS now (glibc's malloc_trim), e.g. before measuring what a step adds to the RSS."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


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


def matmul_sizes(precision: str, device: torch.device) -> list[int]:
    """Square sizes to find the matmul ceiling at: large enough to saturate the device, small enough for an emulated dtype."""
    if device.type == "cuda":
        return [4096, 8192]
    if precision == "bf16" and not cpu_has_fast_bf16():  # emulated bf16 runs ~1 GFLOP/s: keep each product small
        return [256, 512]
    return [1024, 2048]


def peak_flops(device: torch.device, precision: str, cache_dir: Path | None = None) -> float:
    """Peak FLOP/s for MFU: a known table for GPUs, a (cached) measurement for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32, fp32) in GPU_PEAK_FLOPS.items():
            if key in name:
                if precision in ("bf16", "fp16"):
                    return half
                return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32  # fp32 matmuls use TF32 unless "highest"
    dtype = autocast_dtype(precision) or torch.float32
    key = f"{device_name(device)}|{torch.get_num_threads()}|{dtype}|best of {matmul_sizes(precision, device)}"
    cache = (cache_dir / "peak_flops.json") if cache_dir else None
    known = {}
    if cache and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    if key not in known:
        known[key] = max(measure_matmul_flops(dtype, device, size=size) for size in matmul_sizes(precision, device))
        if cache:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known, indent=1))
            except OSError:
                pass
    return known[key]
