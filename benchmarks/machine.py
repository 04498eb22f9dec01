"""Machine facts and matrix-multiply rates, shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def facts() -> dict:
    """CPU, its fast-matmul features, cores, RAM, torch and threads."""
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_name(),
        "bf16_matmul_in_hardware": sorted(flags & {"avx512_bf16", "amx_bf16"}) or "no (emulated)",
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def matmul_gflops(dtype, n: int = 2048, budget_s: float = 3.0, device: str = "cpu") -> float:
    """Median GFLOP/s of an n x n @ n x n product in `dtype` on `device` (fewer repeats when it
    is slow)."""
    import statistics

    import torch

    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed() -> float:
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - start

    timed()  # warm-up (on a GPU: kernel selection)
    first = timed()  # a first timing to size the repeats
    times = [first]
    for _ in range(max(0, min(5, int(budget_s / max(first, 1e-6))))):
        times.append(timed())
    return 2 * n**3 / statistics.median(times) / 1e9
