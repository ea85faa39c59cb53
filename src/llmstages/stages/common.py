"""What every training stage shares: the optimizer and LR schedule, the Trainer, resume, and output writing.

A stage's ``run(cfg, out_dir)`` builds its LightningModule and data, then calls :func:`fit` and
:func:`finish`. The Lightning Trainer owns the loop; checkpoints for resume live in
``outputs/checkpoints/<stage>-<config hash>/`` (outside the DVC-owned output, which DVC clears before a
rerun), so a stage killed mid-run and started again with the same config resumes from its last checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import write_json
from ..tracking import (combined_md5, end_parent_runs, git_commit, in_pipeline, lineage_tags, log_summary,
                        make_loggers, pipeline_run_id, project_path, run_ids, tree_md5s)

log = logging.getLogger("llmstages")


def adamw_with_schedule(params, lr: float, weight_decay: float, betas, eps: float, warmup_steps: int,
                        max_steps: int, min_lr_ratio: float):
    """AdamW (multi-tensor ``foreach`` kernel) + linear warmup then cosine decay to ``min_lr_ratio * lr`` at
    ``max_steps``. Optimizer state is kept in the parameters' dtype (float32 under mixed precision).

    Not the fused kernel: Lightning refuses gradient clipping with an optimizer that unscales gradients itself
    (fused AdamW) under mixed precision. ``params`` are parameter groups (see
    :func:`llmstages.model.param_groups`). Returns Lightning's ``{"optimizer", "lr_scheduler"}`` dict with a
    per-step schedule.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, foreach=True)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def optim_kwargs(cfg: DictConfig) -> dict:
    """Plain keyword arguments for :func:`adamw_with_schedule` from a stage config."""
    o = cfg.optim
    return dict(lr=o.lr, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps, warmup_steps=o.warmup_steps,
                max_steps=cfg.trainer.max_steps, min_lr_ratio=o.min_lr_ratio)


def log_encoding(stage: str, **sets) -> None:
    """Log one line per encoded set: rows read, kept, truncated, dropped per reason, tokens."""
    for name, stats in sets.items():
        log.info("%s %s set: %s", stage, name, ", ".join(f"{k} {v}" for k, v in stats.summary().items()))


def encoding_metrics(**sets) -> dict[str, int]:
    """``{"<set>_<count>": n}`` for each set's :meth:`~llmstages.data.datasets.EncodeStats.summary`."""
    return {f"{name}_{k}": v for name, stats in sets.items() for k, v in stats.summary().items()}


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


def config_hash(cfg: DictConfig, *paths: str | Path) -> str:
    """Short hash of the resolved config and of the listed input files' sizes and mtimes."""
    h = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode())
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


_OPEN: list["Stage"] = []  # stages started in this process and not finished (their tracking runs are open)


_ALLOCATOR_TUNED = False


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


def fail_open_stages() -> None:
    """Mark the tracking runs of unfinished stages as failed (called by the CLI when a stage raises)."""
    while _OPEN:
        loggers = _OPEN.pop().loggers
        for lg in loggers:
            lg.finalize("failed")
        end_parent_runs(loggers, "FAILED")


class Stage:
    """Plumbing of one stage run: loggers, Trainer with resumable checkpoints, metrics and outputs.

    Raises:
        ValueError: when ``out_dir`` is one of ``inputs`` or holds one (writing the output would overwrite it).
    """

    def __init__(self, name: str, cfg: DictConfig, out_dir: str | Path, inputs: list[str | Path]) -> None:
        self.name, self.cfg, self.out_dir = name, cfg, Path(out_dir)
        out = self.out_dir.resolve()
        for inp in inputs:
            if out == Path(inp).resolve() or out in Path(inp).resolve().parents:
                raise ValueError(f"out_dir={out_dir} is or holds this stage's input {inp}: writing the output there "
                                 "would overwrite it; choose another folder")
        self.rank_zero = is_rank_zero()  # under DDP the other ranks only train: no trackers, lineage or log lines
        keep_freed_host_memory()
        self.pipeline_run = pipeline_run_id()
        commit, dirty = git_commit()
        self.tags = {"stage": name, "pipeline_run": self.pipeline_run, "git_commit": commit, "git_dirty": str(dirty)}
        env_tags = {"dvc_exp_name": "DVC_EXP_NAME", "sweep": "LLMSTAGES_SWEEP", "sweep_job": "LLMSTAGES_SWEEP_JOB"}
        self.tags.update({k: os.environ[v] for k, v in env_tags.items() if os.environ.get(v)})
        key = config_hash(cfg, *inputs)
        if "sweep" in self.tags:  # a sweep job resumes only itself, never another run of the same config
            key = hashlib.sha256(f"{key}:{self.tags['sweep']}:{self.tags.get('sweep_job')}".encode()).hexdigest()[:12]
        self.ckpt_dir = Path("outputs/checkpoints") / f"{name}-{key}"
        run_name = f"{name}-{self.pipeline_run}" if "sweep" not in self.tags else \
            f"{name}-{Path(self.tags['sweep']).name}-job{self.tags.get('sweep_job', '')}"
        lc = cfg.logger
        uri = project_path(lc.mlflow_tracking_uri) if "mlflow" in lc.backends else None
        lineage, self.lineage = lineage_tags(inputs, uri) if self.rank_zero else ({}, {})
        self.tags.update(lineage)
        # A rerun after an interruption (its resume checkpoint is there) continues the same tracking runs.
        ids_file = self.ckpt_dir / "tracking.json"
        resume = json.loads(ids_file.read_text()) if (self.ckpt_dir / "last.ckpt").is_file() and ids_file.is_file() \
            else None
        parent = ("pipeline_run", self.pipeline_run) if in_pipeline() else \
            ("sweep", self.tags["sweep"]) if "sweep" in self.tags else None
        self.loggers = make_loggers(list(lc.backends), stage=name, run_name=run_name, tags=self.tags,
                                    experiment=lc.experiment, mlflow_tracking_uri=lc.mlflow_tracking_uri,
                                    mlflow_artifact_location=lc.mlflow_artifact_location,
                                    wandb_project=lc.wandb_project, wandb_mode=lc.wandb_mode,
                                    wandb_dir=lc.wandb_dir, csv_dir=lc.csv_dir, parent=parent,
                                    resume=resume) if self.rank_zero else []
        if self.loggers:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(ids_file, run_ids(self.loggers))
        flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
        # The precision the Trainer gets ("auto" resolved for this machine), in the log, meta.json and the trackers.
        self.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator) if "trainer" in cfg else None
        if self.precision:
            flat["trainer.precision_used"] = self.precision
        if self.precision and self.rank_zero:
            log.info("%s: training in %s (trainer.precision=%s)", name, self.precision, cfg.trainer.precision)
        for lg in self.loggers:
            lg.log_hyperparams(flat)
            if type(lg).__name__ == "WandbLogger":  # MLflow has them as run tags
                lg.experiment.config.update({f"lineage/{k}": v for k, v in self.tags.items()}, allow_val_change=True)
        self.started = time.time()
        _OPEN.append(self)

    def trainer(self, callbacks: list | None = None, **overrides) -> L.Trainer:
        """A Lightning Trainer from ``cfg.trainer`` that writes resumable checkpoints to ``ckpt_dir``.

        Besides the tracking loggers, every metric the stage logs goes to ``out_dir/curves/`` as DVC plot files
        (:func:`~llmstages.tracking.curve_logger`; continued when the run resumes from its checkpoint).

        Raises:
            ValueError: for processes started by spawn or fork (``ddp_spawn``, ``ddp_fork``), and for a multi-process
                run that is a job of a Hydra multirun.
        """
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

        from ..tracking import curve_logger

        t = self.cfg.trainer
        ckpt = ModelCheckpoint(dirpath=self.ckpt_dir, save_last=True, save_top_k=0,
                               every_n_train_steps=t.checkpoint_every_n_steps)
        cbs = [ckpt, *(callbacks or []), LearningRateMonitor(logging_interval="step")]
        curves = curve_logger(self.ckpt_dir / "curves", self.out_dir, resume=(self.ckpt_dir / "last.ckpt").is_file())
        if t.enable_progress_bar:
            cbs.append(StepProgressBar(self.name))
        kwargs = dict(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
                      precision=self.precision, max_steps=t.max_steps, max_epochs=-1,
                      val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                      limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
                      accumulate_grad_batches=t.accumulate_grad_batches, enable_progress_bar=t.enable_progress_bar,
                      gradient_clip_val=self.cfg.optim.grad_clip or None, logger=[*self.loggers, curves],
                      callbacks=cbs, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(self.ckpt_dir))
        kwargs.update(overrides)
        trainer = L.Trainer(**kwargs)
        from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            raise ValueError(f"trainer.strategy={t.strategy}: processes started by spawn or fork are not supported; "
                             "use trainer.strategy=ddp (Lightning reruns the command for each process)")
        if trainer.world_size > 1 and "sweep" in self.tags:
            raise ValueError(f"trainer.devices={t.devices} with strategy={t.strategy}: a multi-process run cannot be "
                             "a job of a Hydra multirun (Lightning relaunches the script per process, outside the "
                             "sweep); run the values one by one, or queue them: dvc exp run --queue")
        return trainer

    def fit(self, trainer: L.Trainer, module: L.LightningModule, train_dl, val_dl=None) -> int:
        """Fit, resuming from ``ckpt_dir/last.ckpt`` when a previous run of the same config was interrupted.

        Returns the global step the run resumed from (0 for a fresh start).
        """
        last = self.ckpt_dir / "last.ckpt"
        resumed = 0
        if last.is_file():
            resumed = int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", 0))
        if last.is_file() and self.rank_zero:
            log.warning("%s: resuming from %s (step %d)", self.name, last, resumed)
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if last.is_file() else None)
        return resumed

    def finish(self, metrics: dict, artifacts: list[Path] | None = None) -> dict:
        """Write ``metrics.json`` and the config used to ``out_dir``, log them, and drop the resume checkpoints."""
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        metrics["wall_seconds"] = round(time.time() - self.started, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        write_json(self.out_dir / "metrics.json", metrics)
        outputs = tree_md5s([self.out_dir])
        output_md5 = combined_md5(outputs, self.out_dir)  # what a downstream stage finds as its input
        for lg in self.loggers:
            if type(lg).__name__ == "MLFlowLogger":
                lg.experiment.set_tag(lg.run_id, "output_md5", output_md5)
            elif type(lg).__name__ == "WandbLogger":
                lg.experiment.config.update({"lineage/output_md5": output_md5}, allow_val_change=True)
        with tempfile.TemporaryDirectory() as tmp:  # lineage.json: an artifact, not a file of the stage output
            lineage = Path(tmp) / "lineage.json"
            write_json(lineage, {**self.lineage, "tags": self.tags, "outputs": outputs, "output_md5": output_md5})
            files = [self.out_dir / "metrics.json", self.out_dir / "config.yaml", lineage, *(artifacts or [])]
            log_summary(self.loggers, metrics, files)
        if self in _OPEN:
            _OPEN.remove(self)
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return metrics

    def log_probes(self, prompts: list[str], responses: list[str], rewards: list[float] | None = None) -> None:
        """Log the probe prompts' answers (and reward-model scores) as a table: MLflow artifact ``probes.json``
        (compare it across runs in the UI's artifact view), W&B table ``probes``, and one log line each."""
        rows = [{"prompt": p, "response": r, **({"reward": round(rewards[i], 4)} if rewards else {})}
                for i, (p, r) in enumerate(zip(prompts, responses))]
        for row in rows:
            log.info("%s probe: %s", self.name, " | ".join(f"{k}={v!r}" for k, v in row.items()))
        if not rows:
            return
        cols = list(rows[0])
        for lg in self.loggers:
            if type(lg).__name__ == "MLFlowLogger":
                lg.experiment.log_table(lg.run_id, data={c: [r[c] for r in rows] for c in cols},
                                        artifact_file="probes.json")
            elif type(lg).__name__ == "WandbLogger":
                lg.log_table(key="probes", columns=cols, data=[[r[c] for c in cols] for r in rows])

    def meta(self, **extra) -> dict:
        """The ``meta.json`` of a stage output: stage, pipeline run, commit, the precision it trained in, and
        stage-specific fields."""
        return {"stage": self.name, **self.tags, **({"precision": self.precision} if self.precision else {}), **extra}


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar over the whole run: one bar named after the stage that counts optimizer steps
    (``trainer.global_step`` of ``trainer.max_steps``, from the resumed step on a resume), not batches of the
    current epoch (runs here are bounded by ``max_steps`` with ``max_epochs=-1``, which the stock bar shows as
    "Epoch 3/-2", then "Epoch 3 13/29" in a stage whose epochs are short).

    Its metrics are read only at the trainer's log interval: reading them copies each logged tensor to the host, a
    device synchronisation that the stock bar makes after every training step.

    Where the console is not a terminal (output redirected to a file, a pipe or CI), Rich draws the bar only once,
    when the stage ends; there a log line gives the step, steps/s, the time left and the training metrics every
    tenth of the run and at least every ``line_every_s`` seconds, and a line after each validation gives the
    validation metrics (through the same ``llmstages`` logger as the stage's other lines).
    """

    def __init__(self, stage: str, line_every_s: float = 300.0) -> None:
        super().__init__()
        self.stage, self.line_every_s = stage, line_every_s
        self._start: tuple[float, int] | None = None  # (monotonic time, global step) when training started
        self._last_line: tuple[float, int] = (0.0, -1)

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps  # > 0: every stage's config is validated so

    def _get_train_description(self, current_epoch: int) -> str:
        return self.stage

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None:  # one bar for the whole run: not reset at each epoch
            super().on_train_epoch_start(trainer, pl_module)
        self._begin(trainer)

    def _begin(self, trainer) -> None:
        """Once per run: the bar from the step the run starts at, and the clock of the log lines. At the first
        epoch start, or at the first batch end of a run resumed mid-epoch (Lightning skips the epoch start)."""
        if self._start is not None:
            return
        if self.progress is not None and self.train_progress_bar_id is not None:
            # Resumed runs start at their step (reset, not update: the jump would count in Rich's speed).
            self.progress.reset(self.train_progress_bar_id, total=self.total_train_batches,
                                completed=trainer.global_step)
        self._start = self._last_line = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._begin(trainer)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        if self._console is not None and not self._console.is_terminal:
            self._log_line(trainer, pl_module)

    def _update_metrics(self, trainer, pl_module) -> None:
        if trainer.training and not _writes_step(trainer, trainer.global_step):
            return
        super()._update_metrics(trainer, pl_module)

    def configure_columns(self, trainer) -> list:
        """Lightning's columns, with the speed in steps/s on the stage's bar (batches/s on validation's)."""
        from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
        from rich.text import Text

        bar = self

        class SpeedColumn(ProcessingSpeedColumn):
            def render(self, task) -> Text:
                unit = "steps/s" if task.id == bar.train_progress_bar_id else "batches/s"
                return Text(f"{task.speed or 0:.2f} {unit}", style=self.style)

        return [SpeedColumn(self.theme.processing_speed) if isinstance(c, ProcessingSpeedColumn) else c
                for c in super().configure_columns(trainer)]

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the tracker's run id cut to 4 characters ("184_"): it names nothing to look up
        return metrics

    def _log_line(self, trainer, pl_module) -> None:
        step, total, now = trainer.global_step, trainer.max_steps, time.monotonic()
        if self._start is None or step == self._last_line[1]:
            return
        tenth = max(1, total // 10)
        crossed = step // tenth > self._last_line[1] // tenth  # steps may jump (PPO: several per batch)
        if not (step == total or crossed or now - self._last_line[0] >= self.line_every_s):
            return
        self._last_line = (now, step)
        rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)  # optimizer steps per second
        parts = [f"{self.stage}: step {step}/{total} ({100 * step / total:.0f}%)", f"{rate:.2f} steps/s"]
        if rate > 0 and step < total:
            parts.append(f"{datetime.timedelta(seconds=round((total - step) / rate))} left")
        log.info(" · ".join(parts + _fmt(self.get_metrics(trainer, pl_module), val=False)))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._console is not None \
                and not self._console.is_terminal:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # all of them, not the bar's only
            log.info(" · ".join([f"{self.stage}: validation at step {trainer.global_step}", *_fmt(metrics, val=True)]))


def _fmt(metrics: dict, val: bool) -> list[str]:
    """``key=value`` texts of the validation metrics (``val=True``) or of the others."""
    return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            if k.startswith("val") == val]


def is_log_step(module: L.LightningModule) -> bool:
    """Whether the logger writes this training step's metrics: the ``trainer.log_every_n_steps``-th optimizer
    steps, and the last (``max_steps``). Call it in ``training_step`` before the optimizer step and log only
    then: Lightning keeps only the last value of a step metric, and each ``self.log`` call costs about 1 ms of
    Python on a CPU (a tenth of a ``tiny`` pretraining step)."""
    return _writes_step(module.trainer, module.global_step + 1)


def _writes_step(trainer: L.Trainer, step: int) -> bool:
    """Whether the logger writes the metrics of optimizer step ``step`` (counted from 1)."""
    every = trainer.log_every_n_steps
    return (every > 0 and step % every == 0) or step == trainer.max_steps


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)


def freeze(*modules: torch.nn.Module) -> None:
    """Frozen models (reference, reward model): no gradients, eval mode."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False).eval()


def manual_step(module: L.LightningModule, loss: torch.Tensor, grad_clip: float) -> None:
    """One optimizer and LR-scheduler step under Lightning's manual optimization (gradient-norm clipping)."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    opt.zero_grad()
    module.manual_backward(loss)
    if grad_clip:
        module.clip_gradients(opt, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
    opt.step()
    sched.step()
