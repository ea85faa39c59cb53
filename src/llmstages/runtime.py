"""What the machine decides: the precision a stage trains in, ``torch.compile`` with an eager fallback, the host
allocator, the process's rank, seeding, and :func:`check_trainer`, every check of the ``trainer`` settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("llmstages")

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # trainer.accelerator
# trainer.precision: "auto" (resolve_precision) and the values Lightning's Trainer accepts
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")


def check_trainer(t, runs_here: bool, manual_optimization: str = "") -> list[tuple[str, str]]:
    """Every check of a stage's ``trainer`` settings ``t``, as ``(key, message)`` problems (empty: all good).

    Values alone: positive step counts and intervals, a known accelerator and precision, ``deterministic`` one
    of false, true and "warn", at least one device
    and node, and no ``accumulate_grad_batches`` where the stage steps the optimizer itself (Lightning's manual
    optimization; ``manual_optimization`` names who does, e.g. "rlhf.algorithm=ppo", whose minibatch size sets
    the step instead). Where the stage is about to
    run here (``runs_here``; not when ``params.yaml`` is composed, perhaps for another machine): a CUDA
    accelerator needs a GPU that this torch sees, the strategy must be one of Lightning's, processes started by
    spawn or fork are refused (the stage's objects are not picklable; ``ddp`` reruns the command per process),
    and a multi-process run cannot be a job of a Hydra multirun (``LLMSTAGES_SWEEP`` set).
    """
    problems = []
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "accumulate_grad_batches",
                "limit_val_batches"):
        if t[key] <= 0:
            problems.append((key, f"must be > 0, got {t[key]}"))
    if t.accelerator not in ACCELERATORS:
        problems.append(("accelerator", f"expected {', '.join(ACCELERATORS[:-1])} or {ACCELERATORS[-1]}, got "
                                        f"{t.accelerator!r}"))
    gpu = t.accelerator in ("gpu", "cuda")
    if isinstance(t.devices, int) and t.devices < 1 and not (t.devices == -1 and gpu):
        problems.append(("devices", f"must be >= 1 (processes, one per device), or -1 for every visible GPU with "
                                    f"trainer.accelerator=gpu; got {t.devices} with accelerator={t.accelerator}"))
    if t.num_nodes < 1:
        problems.append(("num_nodes", f"must be >= 1, got {t.num_nodes}"))
    if str(t.precision) not in PRECISIONS:
        problems.append(("precision", f"unknown value {t.precision!r}; expected auto, 32-true, bf16-mixed, 16-mixed, "
                                      "bf16-true, 16-true or 64-true (transformer-engine on GPUs with it installed)"))
    if t.deterministic not in (False, True, "warn"):
        problems.append(("deterministic", f"expected false, true or warn, got {t.deterministic!r}"))
    if manual_optimization and t.accumulate_grad_batches > 1:
        problems.append(("accumulate_grad_batches", f"is {t.accumulate_grad_batches}, but {manual_optimization} steps "
                         "the optimizer itself (manual optimization) and cannot accumulate micro-batches: set it to 1 "
                         "and choose the algorithm's minibatch_size instead"))
    if problems or not runs_here:
        return problems
    from lightning.pytorch.strategies import StrategyRegistry

    if gpu and not torch.cuda.is_available():
        problems.append(("accelerator", f"is {t.accelerator}, but this torch ({torch.__version__}) sees no CUDA GPU; "
                                        "use trainer=cpu"))
    if t.strategy != "auto" and t.strategy not in StrategyRegistry.available_strategies():
        problems.append(("strategy", f"{t.strategy!r} is not a Lightning strategy; expected auto, ddp, fsdp, "
                                     "deepspeed, ... (Lightning's StrategyRegistry has them all)"))
    elif t.strategy in StrategyRegistry and \
            StrategyRegistry[t.strategy]["init_params"].get("start_method") in ("spawn", "fork"):
        problems.append(("strategy", f"{t.strategy!r} starts its processes by spawn or fork, which is not supported; "
                                     "use trainer.strategy=ddp (Lightning reruns the command for each process)"))
    if isinstance(t.devices, int) and t.devices > 0:
        devices = t.devices
    elif not isinstance(t.devices, (int, str)):  # a list of device ids
        devices = len(t.devices)
    else:  # -1 or "auto": every visible GPU, or one CPU process
        devices = torch.cuda.device_count() if gpu else 1
    if devices * t.num_nodes > 1 and os.environ.get("LLMSTAGES_SWEEP"):
        problems.append(("devices", f"{t.devices} with strategy={t.strategy}: a multi-process run cannot be a job of "
                                    "a Hydra multirun (Lightning relaunches the script per process, outside the "
                                    "sweep); run the values one by one, or queue them: dvc exp run --queue"))
    return problems


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: AMX or AVX-512 BF16 among ``/proc/cpuinfo``'s flags
    (False where there is no such file). Without them oneDNN emulates bf16, tens of times slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & flags)

def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"``: ``bf16-mixed`` where bf16 matrix units exist (CUDA with bf16, CPUs with AMX or AVX-512 BF16),
    else ``32-true``. Any other value is passed to Lightning unchanged, except an fp16 one on a CPU, which has no
    fp16 autocast: it becomes ``bf16-mixed`` where the CPU has bf16 units, else ``32-true`` (Lightning would make
    it an emulated bf16-mixed), with a warning; a bf16 one on a CPU without those units logs a warning (it runs,
    emulated, tens of times slower than ``32-true``)."""
    on_cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if precision == "auto":
        if on_cuda:
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "bf16-mixed" if cpu_has_bf16_units() else "32-true"
    if str(precision).startswith("16") and accelerator in ("cpu", "auto") and not on_cuda:
        fallback = "bf16-mixed" if cpu_has_bf16_units() else "32-true"  # the fast one of the two on this CPU
        log.warning("trainer.precision=%s: fp16 autocast does not exist on a CPU; training in %s instead",
                    precision, fallback)
        precision = fallback
    if str(precision).startswith("bf16") and not on_cuda and not cpu_has_bf16_units():  # 32 may come as an int
        log.warning("trainer.precision=%s on a CPU without AMX or AVX-512 BF16: bf16 matrix multiplies are emulated "
                    "here, tens of times slower than 32-true (which trainer.precision=auto picks on this CPU)",
                    precision)
    return precision

class CompiledCall:
    """``fn`` (a model or one of its methods) through ``torch.compile`` with ``backend``, falling back to ``fn``
    itself with a warning when compiling is unavailable here or fails (at the first call, or at a recompile);
    ``enabled=False`` calls ``fn``. An error that ``fn`` raises eagerly too (bad input) is raised.

    Not an ``nn.Module``, so a LightningModule holding one keeps the model's own checkpoint keys.
    """

    def __init__(self, fn, enabled: bool, name: str = "model", backend="inductor") -> None:
        self.fn, self.name, self.compiled = fn, name, None
        if not enabled:
            return
        reason = compile_unavailable(backend)
        if reason:
            log.warning("trainer.compile: not compiling the %s (%s); running it eagerly", name, reason)
            return
        self.compiled = torch.compile(fn, backend=backend)
        log.info("trainer.compile: compiling the %s with torch.compile (the first steps are slow)", name)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a compiler failure, unless the eager call raises too
            out = self.fn(*args, **kwargs)
            while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
                err = inner  # the compiler's own error, under TorchDynamo's wrappers
            log.warning("trainer.compile: torch.compile failed for the %s (%s: %s); running it eagerly",
                        self.name, type(err).__name__, (str(err).strip().splitlines() or [""])[0])
            self.compiled = None
            return out

def compile_unavailable(backend="inductor") -> str:
    """Why ``torch.compile`` cannot help here (an empty string when it can): a Python version that TorchDynamo
    does not support, or, for the default inductor backend on a machine without CUDA, no C++ compiler."""
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported

        if not is_dynamo_supported():
            return f"TorchDynamo does not support Python {sys.version.split()[0]} on {sys.platform}"
    except ImportError:
        return "this torch build has no TorchDynamo"
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if backend == "inductor" and not torch.cuda.is_available() and not any(shutil.which(c) for c in compilers):
        return "no C++ compiler found for the CPU backend: install g++ or set CXX"
    return ""


_ALLOCATOR_TUNED = False


def discard_output(name: str = "stdout") -> None:
    """Point ``sys.<name>``'s file descriptor at ``os.devnull``: its reader has gone (``llmstages sft | head``), and
    the run goes on without printing rather than failing with ``BrokenPipeError`` (as the Python docs' note on
    SIGPIPE advises). What the stage writes to files and trackers is not affected."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, getattr(sys, name).fileno())
    finally:
        os.close(devnull)


def process_age_s() -> float:
    """Seconds since this process started. On Linux: ``CLOCK_BOOTTIME`` less the start time in
    ``/proc/self/stat`` (clock ticks since boot), exact to a tick (10 ms). Elsewhere ``psutil``'s
    ``create_time``, which on Linux adds a boot time the kernel gives in whole seconds (up to 1 s off: 0.27 s
    too old on the 2-core EPYC)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS, Windows), no CLOCK_BOOTTIME
        import psutil

        return time.time() - psutil.Process().create_time()


def keep_freed_host_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves each allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
    fresh ``mmap`` and unmaps it on free. The large activations of a training step are allocated and freed
    every step, so the kernel zero-fills them again page by page on first touch: about 170,000 minor page
    faults (0.7 GB) per step at the ``base`` preset. ``mallopt(M_MMAP_MAX, 0)`` puts every allocation on the
    heap, and ``M_TRIM_THRESHOLD`` (2 GiB) keeps freed heap memory for the next step. This is the cost that the
    PyTorch CPU performance guide's advice to preload jemalloc or tcmalloc removes. The process's resident
    memory stays near its peak, which training reaches every step anyway. Measured on a 2-core Xeon in
    alternating runs with and without it: a ``small`` bf16 pretraining step about 1.3x faster, ``base`` about
    1.15x.

    Called once per process by :class:`Stage`; later calls do nothing. Returns True if the setting was
    applied, False where the C library is not glibc (macOS, musl, Windows), which is left alone.
    """
    global _ALLOCATOR_TUNED
    import ctypes

    if _ALLOCATOR_TUNED:
        return True
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name, no such library
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    return _ALLOCATOR_TUNED

def is_rank_zero() -> bool:
    """Whether this process is the first of a multi-process (DDP) run, or the only process.

    Under DDP every process runs the stage; rank 0 alone tracks the run, evaluates the trained model and writes
    the output, the others only train. Known before the Trainer exists, from the environment that Lightning's
    launcher (or torchrun, SLURM) gives each process: ``LOCAL_RANK``/``RANK`` as Lightning reads them, and
    ``NODE_RANK`` on the other nodes.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (and the data loader workers) for a reproducible run."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
