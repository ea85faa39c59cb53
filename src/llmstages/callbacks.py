"""Lightning callbacks and log-step rules shared by the stages: the step-counting progress bar, and which steps
write their metrics."""

from __future__ import annotations

import datetime
import logging
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from .runtime import discard_output

log = logging.getLogger("llmstages")


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
    validation metrics (through the same ``llmstages`` logger as the stage's other lines). There the bar is not
    redrawn at each step either: Lightning's bar has a thread redraw it after every update (up to 100 times a
    second), which took 8 s of CPU in a 2-minute sft run on 2 cores, beside the training it slowed down. In a
    terminal it is redrawn at most ``refresh_per_second`` times a second.
    """

    def __init__(self, stage: str, line_every_s: float = 300.0, refresh_per_second: int = 4) -> None:
        super().__init__(refresh_rate=refresh_per_second)
        self.stage, self.line_every_s = stage, line_every_s
        self._start: tuple[float, int] | None = None  # (monotonic time, global step) when training started
        self._last_line: tuple[float, int] = (0.0, -1)

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        console = self._console
        if console is not None:

            def on_broken_pipe() -> None:  # Rich's own exits the process (SystemExit(1)), losing the stage's work
                console.quiet = True
                discard_output("stdout")

            console.on_broken_pipe = on_broken_pipe

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

    def refresh(self, hard: bool = False) -> None:
        if hard or self._console is None or self._console.is_terminal:  # a file or pipe: drawn once, at the end
            super().refresh(hard)

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

class LearningRate(L.Callback):
    """Logs ``train/lr``, the learning rate of the optimizer step about to run (every parameter group of a stage
    shares it: one series, where Lightning's ``LearningRateMonitor`` draws one per group), at the steps whose
    metrics the logger writes (:func:`is_log_step`; every iteration of a manual-optimization RL module)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.optimizers and (is_log_step(pl_module) or not pl_module.automatic_optimization):
            pl_module.log("train/lr", float(trainer.optimizers[0].param_groups[0]["lr"]))


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


class StageClock(L.Callback):
    """When this process's training started (its first training batch) and ended (``time.time()``, seconds):
    with the process's own start they split a stage's wall time into start-up, training and what follows it
    (:meth:`~llmstages.stages.stage.Stage.finish` logs the split; ``benchmarks/overhead.py`` reads it)."""

    def __init__(self) -> None:
        self.first_batch_at: float | None = None
        self.train_end_at: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_end_at = time.time()
