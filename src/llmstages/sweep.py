"""Hydra sweeps of a stage: unique run folders and a summary table of the jobs.

* ``${llmstages.uid:}``: a resolver for ``hydra.run.dir`` / ``hydra.sweep.dir`` (``conf/entry/*.yaml``) that makes
  each process's folder unique even when two runs start in the same second: ``<pid>-<6 random hex digits>`` (the
  pid separates processes on one machine, the random part machines sharing a folder), the same value for every use
  within one process. Registered when this module is imported: by ``llmstages <stage>``
  and by Hydra when it instantiates :class:`SweepSummary` (both before any folder is resolved). Composing
  ``entry/<stage>`` with Hydra's Compose API does not resolve the ``hydra`` node, so it needs no registration.
* :class:`SweepSummary`: the Hydra callback (``hydra.callbacks.sweep_summary``) that, in a multirun, collects each
  job's overrides, objective value and folder, and writes ``summary.md`` and ``summary.csv`` to the sweep folder
  (after every job, so a sweep that stops early still has one) and prints the table to stderr at the end.
  It works with any sweeper (basic, Optuna) that runs jobs through Hydra's launcher.
"""

from __future__ import annotations

import atexit
import csv
import io
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

UID = f"{os.getpid()}-{secrets.token_hex(3)}"  # this process's run-folder suffix


def register_resolvers() -> None:
    """Register ``${llmstages.uid:}`` (idempotent); it returns :data:`UID`."""
    if not OmegaConf.has_resolver("llmstages.uid"):
        OmegaConf.register_new_resolver("llmstages.uid", lambda: UID, use_cache=True)


register_resolvers()


class JobFailed(RuntimeError):
    """A sweep job stopped with a one-line error (a bad value, a missing file); Hydra records the job as failed."""


@dataclass
class Job:
    """One sweep job: its number, ``key=value`` overrides, objective value (None if failed) and output folder."""

    num: int
    overrides: list[str]
    value: float | None
    folder: str
    error: str = ""


@dataclass
class SweepSummary(Callback):
    """Hydra callback: a table of a multirun's jobs (``summary.md``, ``summary.csv`` and stderr).

    The objective is read from the composed config (``objective.metric``, ``objective.direction``); a job's value
    is what the task returned (the stage's ``metrics[objective.metric]``, in that metric's own units, e.g. nats per
    token for ``val_loss``). A failed job (the task raised, or returned no number) is listed as failed with the first
    line of its error and never chosen as best; nor is a job whose value is not finite (NaN, inf). The callback
    raises nothing for a failed job; only writing the files can raise (``OSError``). Runs (not multiruns) are
    ignored.
    """

    jobs: list[Job] = field(default_factory=list)
    sweep_dir: Path | None = None
    metric: str = "objective"
    direction: str = "minimize"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs = []
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.metric = str(OmegaConf.select(config, "objective.metric", default="objective"))
        self.direction = str(OmegaConf.select(config, "objective.direction", default="minimize"))
        atexit.register(self._finish)  # a sweep that stops on a failed job never reaches on_multirun_end

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run
            return
        value, error = None, ""
        if job_return.status == JobStatus.FAILED:  # (its return_value property would print and raise the error)
            err = getattr(job_return, "_return_value", None)
            error = (str(err).splitlines() or [type(err).__name__])[0]
        else:
            try:
                value = float(job_return.return_value)
            except (TypeError, ValueError):
                error = f"returned {job_return.return_value!r}, not a number"
        self.jobs.append(Job(int(config.hydra.job.num), [str(o) for o in job_return.overrides or []], value,
                             str(config.hydra.runtime.output_dir), error))
        self.write()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._finish)
        self._finish()

    def _finish(self) -> None:
        if self.sweep_dir is not None and self.jobs:
            self.write()
            from rich.console import Console

            console = Console(stderr=True)
            console.print(self.table())
            console.print(f"sweep summary: {self.sweep_dir}/summary.md, summary.csv", soft_wrap=True, highlight=False)
        self.sweep_dir = None

    # --- the table -------------------------------------------------------------------------------------------

    def best(self) -> Job | None:
        """The completed job with the lowest (minimize) or highest (maximize) finite value; the first on ties."""
        done = [j for j in self.jobs if j.value is not None and math.isfinite(j.value)]
        if not done:
            return None
        sign = -1 if self.direction == "maximize" else 1
        return min(done, key=lambda j: (sign * j.value, j.num))

    def rows(self, digits: int | None = None) -> tuple[list[str], list[list[str]]]:
        """Header and rows: job, the override keys whose values differ between jobs, the metric, best (``*``),
        status, folder. Cells are strings; the metric has ``digits`` significant digits (None: all, as ``repr``);
        a failed job's metric cell is empty and its status is ``failed: <first line of the error>``."""
        parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in j.overrides) for j in self.jobs]
        keys = list(dict.fromkeys(k for p in parsed for k in p))
        varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
        best = self.best()
        header = ["job", *varying, self.metric, "best", "status", "folder"]
        rows = []
        for job, p in sorted(zip(self.jobs, parsed), key=lambda jp: jp[0].num):
            value = "" if job.value is None else repr(job.value) if digits is None else f"{job.value:.{digits}g}"
            rows.append([str(job.num), *(p.get(k, "") for k in varying), value, "*" if job is best else "",
                         f"failed: {job.error}" if job.value is None else "ok", job.folder])
        return header, rows

    def table(self):
        """The rich table (the CSV's columns but the folder, which is the sweep folder + the job number)."""
        from rich.table import Table

        header, rows = self.rows(digits=6)
        t = Table(title=f"sweep: {len(rows)} jobs, {self.metric} ({self.direction})")
        for h in header[:-1]:
            t.add_column(h, justify="right" if h in ("job", self.metric) else "left")
        for r in rows:
            t.add_row(*r[:-1], style="bold green" if r[header.index("best")] else None)
        return t

    def write(self) -> None:
        """Write ``summary.csv`` (full-precision values) and ``summary.md`` (6 significant digits) into the sweep
        folder, replacing earlier versions."""
        header, rows = self.rows()
        assert self.sweep_dir is not None, "write() outside a multirun"
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        (self.sweep_dir / "summary.csv").write_text(buf.getvalue(), encoding="utf-8")

        def md(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"# Sweep: {self.metric} ({self.direction})", "", md(header), md(["---"] * len(header)),
                 *map(md, self.rows(digits=6)[1])]
        (self.sweep_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
