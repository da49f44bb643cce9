"""Facts about where a trial ran: device description, package versions, git commit."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "optuna", "mlflow", "hydra-core", "datasets", "accelerate",
            "bitsandbytes")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = _cpu_model() or platform.processor() or platform.machine()
    # Same model name, different speed: virtual machines expose different instruction sets, and
    # whether bf16 runs in hardware decides a CPU's bf16 speed.
    isa = torch.backends.cpu.get_cpu_capability() + (", bf16 in hardware" if cpu_has_native_bf16() else "")
    return f"CPU: {cpu} ({isa}), {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware. Without them torch emulates bf16 on the CPU."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@functools.cache  # once a process: every trial that asks gets the same answer
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 throughput of a MiniLM-sized matmul (1280 tokens x 384 -> 1536) on this CPU's
    torch threads, best of 5 each. Timed, not read off CPU flags: the flags do not predict it
    (reports/bench/README.md, "Mixed precision")."""
    import torch

    shape = (1280, 384, 1536)
    return matmul_gflops(*shape, torch.bfloat16, repeats=5) / matmul_gflops(*shape, torch.float32, repeats=5)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def matmul_gflops(m: int, k: int, n: int, dtype=None, repeats: int = 8, device: str = "cpu") -> float:
    """Best-of-`repeats` throughput of an (m x k) @ (k x n) torch.mm on `device` (the CPU: this process's
    torch threads), in GFLOP/s, after one warm-up call (thread pool, caches, packing buffers; CUDA
    context and kernels). On CUDA each timed product is bracketed by synchronize: launches are async."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9
