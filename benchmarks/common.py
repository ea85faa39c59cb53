"""What the benchmarks share: a one-line description of the machine, and the measured matrix-multiply peak.

Import it from a benchmark script run as ``python benchmarks/<name>.py`` (the script's folder is on
``sys.path``): ``from common import machine, matmul_peak``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def machine() -> str:
    """One line: CPU model and cores, its bf16 matrix units (AMX, AVX-512 BF16), the GPU if any, and the
    torch version and thread count (torch is imported here), and the 1-minute load average (other work on the
    machine makes every figure lower)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    units = [u for u in ("amx_bf16", "avx512_bf16") if u in cpu_flags()]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores ({', '.join(units) or 'no bf16 matrix units'}), {gpu}, "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.2f}")


def matmul_peak(dtype, device: str = "cpu", sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0) -> float:
    """Measured matrix-multiply peak in FLOP/s: the best over square ``n x n @ n x n`` products of ``sizes``
    (``2 n^3`` FLOPs each), each timed for about ``seconds`` after a warm-up; larger sizes are skipped once one
    product takes longer than ``seconds`` (an emulated dtype, such as bf16 on a CPU without AMX or AVX-512 BF16,
    would take minutes there). This is the denominator of MFU: what this machine's BLAS (oneDNN / cuBLAS)
    reaches, not a datasheet figure."""
    import torch

    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        sync(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
            if device != "cpu" and reps % 10:
                continue
            sync(device)
        sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * reps / elapsed)
        if elapsed / reps > seconds:
            break
    return best


def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock timings are honest."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
