"""``llmstages compare``: tracked stage runs side by side, read from the MLflow store the stages log to.

One row per run: its name, id, stage and start time, the parameters whose values differ between the listed runs
(the identical ones are only counted), and the chosen metrics; optionally the step curves of some metrics.
Only the standard library is imported here at module level; MLflow, rich and matplotlib load when used.
"""

from __future__ import annotations

import csv
import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

#: y-axis units of the metrics the stages log that have one (the rest are ratios, counts or scores)
UNITS = {"train/lm_loss": "nats/token", "val/lm_loss": "nats/token", "train/bt_loss": "nats/pair",
         "val/bt_loss": "nats/pair", "train/dpo_loss": "nats/pair", "val/dpo_loss": "nats/pair",
         "val/bits_per_byte": "bits/byte", "train/tokens_per_sec": "tokens/s", "train/kl": "nats/response",
         "train/kl_per_token": "nats/token", "train/approx_kl_old_new": "nats/token"}
DEFAULT_METRICS = {"data": ["train_tokens"], "pretrain": ["val_loss"], "sft": ["exact_match_arithmetic"],
                   "reward": ["val_accuracy"], "rlhf": ["rlhf_reward", "rlhf_exact_match_arithmetic"]}


class CompareError(Exception):
    """A problem with the store or the selection, reported as one line."""


def open_store(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri``; a local store must already exist (none is created)."""
    path = _local_path(tracking_uri)
    if path is not None and not path.exists():
        raise CompareError(f"no MLflow store at {path} (run a stage first, or pass --tracking-uri)")
    if tracking_uri.startswith("sqlite:///") and not _is_mlflow_db(path):
        raise CompareError(f"{path} is not an MLflow store (no MLflow tables; nothing was changed)")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _is_mlflow_db(path: Path) -> bool:
    """Whether ``path`` is an SQLite file holding MLflow's tables (read-only check: MLflow would migrate it)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return False
    return {"runs", "experiments"} <= names


def _local_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    return None if "://" in uri else Path(uri)


def find_runs(client, *, stage: str | None = None, experiments: list[str] | None = None,
              tags: list[str] | None = None, status: str | None = "FINISHED", last: int | None = None) -> list:
    """Runs matching the filters, newest first: tag ``stage``, experiment names (default: all), ``key=value``
    tags, status (``None``: any) and at most ``last`` runs."""
    if last is not None and last < 1:
        raise CompareError(f"--last wants a positive number, got {last}")
    if experiments:
        found = {name: client.get_experiment_by_name(name) for name in experiments}
        missing = [name for name, exp in found.items() if exp is None]
        if missing:
            have = ", ".join(e.name for e in client.search_experiments())
            raise CompareError(f"no experiment named {', '.join(missing)} (the store has: {have})")
        ids = [exp.experiment_id for exp in found.values()]
    else:
        ids = [exp.experiment_id for exp in client.search_experiments()]
    conds = [("stage", stage)] if stage else []
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise CompareError(f"--tag wants key=value, got {tag!r}")
        conds.append((key, value))
    where = [f"tags.`{k}` = {_quote(v)}" for k, v in conds] + ([f"attributes.status = '{status}'"] if status else [])
    runs, token = [], None
    while True:
        page = client.search_runs(ids, " AND ".join(where), order_by=["attributes.start_time DESC"],
                                  max_results=min(last or 1000, 1000), page_token=token)
        runs.extend(r for r in page if "llmstages_role" not in r.data.tags)  # not the parent runs (pipeline, sweep)
        token = page.token
        if not token or (last and len(runs) >= last):
            return runs[:last] if last else runs


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def metric_value(run, name: str) -> float | None:
    """The run's final value of metric ``name``: a stage's final metrics have names without ``/`` (as in its
    ``metrics.json``, tracking.log_summary); a curve (``train/lm_loss``) gives its latest point."""
    return run.data.metrics.get(name)


def did_you_mean(unknown: list[str], known) -> str:
    """`` (did you mean val/lm_loss?)`` for the known names closest to the misspelt ones (difflib), else ``""``."""
    from .config import closest

    close = [m for u in unknown if (m := closest(u, known, cutoff=0.75))]
    return f" (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else ""


def choose_metrics(runs, requested: list[str] | None) -> list[str]:
    """``requested`` as given; ``["all"]``: every final metric any run has; none: the per-stage defaults.

    Raises:
        CompareError: when no listed run logged any of ``requested`` (one of them unknown: a warning on stderr).
    """
    every = sorted({k for r in runs for k in r.data.metrics if "/" not in k})
    if requested and "all" in requested:
        return every
    if requested:
        known = {k for r in runs for k in r.data.metrics}
        unknown = [m for m in requested if m not in known]
        if unknown:
            msg = f"no listed run logged {', '.join(unknown)}{did_you_mean(unknown, known)} (known: " \
                  f"{', '.join(sorted(known))})"
            if len(unknown) == len(requested):  # a table of empty columns answers nothing
                raise CompareError(msg)
            print(f"llmstages compare: {msg}", file=sys.stderr)
        return requested
    stages = {r.data.tags.get("stage") for r in runs}
    names = [m for s, ms in DEFAULT_METRICS.items() if s in stages for m in ms]
    return [m for m in names if any(metric_value(r, m) is not None for r in runs)] or every


def differing_params(runs) -> tuple[list[str], int]:
    """``(params with two or more values among the runs that have them, number of the other params)``.

    A param that only some runs have (another stage's key) is not a difference by itself."""
    keys = sorted(set().union(*(r.data.params for r in runs)))
    differ = [k for k in keys if len({r.data.params[k] for r in runs if k in r.data.params}) > 1]
    return differ, len(keys) - len(differ)


def run_name(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def origin(run) -> list[str]:
    """What started the run, for plot labels: ``["exp <DVC experiment>"]``, ``["sweep job <n>"]`` or ``[]``."""
    tags = run.data.tags
    if tags.get("dvc_exp_name"):
        return [f"exp {tags['dvc_exp_name']}"]
    return [f"sweep job {tags['sweep_job']}"] if tags.get("sweep_job") else []


LINEAGE_TAGS = ("git_commit", "git_dirty", "dvc_exp_name", "sweep", "inputs_md5", "upstream_run_id")


def table(runs, params: list[str], metrics: list[str], lineage: bool = False) -> tuple[list[str], list[list]]:
    """Header and rows: run, run_id, stage, start, [status,] [lineage tags,] the given params (str) and metrics
    (float). ``lineage``: the tags that trace a row to its code and data (:data:`LINEAGE_TAGS` any run has)."""
    status = any(r.info.status != "FINISHED" for r in runs)
    tags = [t for t in LINEAGE_TAGS if any(t in r.data.tags for r in runs)] if lineage else []
    header = ["run", "run_id", "stage", "start", *(["status"] if status else []), *tags, *params, *metrics]
    rows = [[run_name(r), r.info.run_id, r.data.tags.get("stage", ""),
             datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S"),
             *([r.info.status] if status else []), *(r.data.tags.get(t, "") for t in tags),
             *(r.data.params.get(k) for k in params),
             *(metric_value(r, m) for m in metrics)] for r in runs]
    return header, rows


def cell(value, full: bool = False) -> str:
    """A table cell: floats in full (round-trip ``repr``) or to 4 significant digits (integers whole)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if full:
            return repr(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def short(column: str, text: str) -> str:
    """A terminal cell: ids and hashes cut to 8 characters, a sweep folder to its name (CSV keeps them whole)."""
    if column in ("run_id", "git_commit", "inputs_md5", "upstream_run_id"):
        return ",".join(part[:8] for part in text.split(","))
    return Path(text).name if column == "sweep" and text else text


def print_rich(header, rows, n_metrics: int, caption: str, file=None) -> None:
    """A rich table, one row per run; or one column per run when that is narrower and the other does not fit."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    cells = [[short(h, cell(v)) for h, v in zip(header, row)] for row in rows]
    wide = Table(title="llmstages compare", caption=caption)
    for i, h in enumerate(header):
        wide.add_column(h, justify="right" if i >= len(header) - n_metrics else "left")
    for row in cells:
        wide.add_row(*row)
    tall = Table(title="llmstages compare", caption=caption)
    tall.add_column("run", style="bold", no_wrap=True, min_width=min(40, max(map(len, header))))
    for row in cells:
        tall.add_column(row[0], justify="right")
    for i, h in enumerate(header[1:], 1):
        tall.add_row(h, *(row[i] for row in cells), end_section=i == len(header) - n_metrics - 1)
    fits = [console.measure(t, options=console.options.update(max_width=10**5)).maximum for t in (wide, tall)]
    console.print(wide if fits[0] <= console.width or fits[0] <= fits[1] else tall)


def markdown(header, rows, n_metrics: int) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    align = ["---"] * (len(header) - n_metrics) + ["---:"] * n_metrics
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(esc(cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(header, rows, file) -> None:
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(v, full=True) for v in row] for row in rows)


def plot_metrics(client, runs, metrics: list[str], labels: list[str]):
    """A matplotlib ``Figure`` (Agg canvas): one subplot per metric, one curve per run of its step history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 1 + 3.5 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        for i, (run, label) in enumerate(zip(runs, labels)):  # a run keeps its colour in every panel
            hist = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], label=label, color=f"C{i % 10}",
                        marker="o" if len(hist) <= 20 else None, markersize=4)
        ax.set(xlabel="optimizer step", ylabel=f"{name} ({UNITS[name]})" if name in UNITS else name, title=name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no run logged {name}", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"llmstages compare: {len(runs)} run{'s' * (len(runs) != 1)}")
    return fig


def compare(*, tracking_uri: str, stage: str | None = None, experiments: list[str] | None = None,
            tags: list[str] | None = None, status: str | None = "FINISHED", last: int | None = None,
            metrics: list[str] | None = None, fmt: str = "rich", output: str | None = None,
            plots: list[str] | None = None, plot_file: str = "compare.png", lineage: bool = False) -> None:
    """Print (or write to ``output``) the comparison table; with ``plots``, save their curves to ``plot_file``;
    with ``lineage``, add the commit, DVC experiment, sweep, input hash and upstream run of each row.

    Raises:
        CompareError: no store, no runs, or a bad filter.
    """
    from mlflow.exceptions import MlflowException

    client = open_store(tracking_uri)
    try:
        runs = find_runs(client, stage=stage, experiments=experiments, tags=tags, status=status, last=last)
        if not runs:
            ids = [e.experiment_id for e in client.search_experiments()]
            if not ids or not client.search_runs(ids, max_results=1):
                raise CompareError(f"no runs in {tracking_uri}")
            filters = [f"stage={stage}"] * bool(stage) + [f"experiment={e}" for e in experiments or []] + \
                [f"tag {t}" for t in tags or []] + [f"status={status}"] * bool(status)
            raise CompareError(f"no runs match {', '.join(filters)} in {tracking_uri}")
        params, n_same = differing_params(runs)
        if plots:  # before any output: a misspelt metric is an error, not an empty chart after the table
            logged = sorted(set().union(*(r.data.metrics for r in runs)))
            unknown = [m for m in plots if m not in logged]
            if unknown:
                finals = [m for m in logged if "/" not in m]
                raise CompareError(f"--plot {', '.join(unknown)}: no run here logged it{did_you_mean(unknown, logged)};"
                                   f" these runs have the curves {', '.join(m for m in logged if '/' in m)}, and "
                                   f"{len(finals)} final values ({', '.join(finals[:4])}, ...: `--metric all` "
                                   "shows them)")
        names = choose_metrics(runs, metrics)
        header, rows = table(runs, params, names, lineage)
        note = f"{n_same} param{'s' * (n_same != 1)} identical across the {len(runs)} run{'s' * (len(runs) != 1)} " \
               "(not shown)"
        with open(output, "w", newline="", encoding="utf-8") if output else nullcontext(sys.stdout) as out:
            if fmt == "rich":
                print_rich(header, rows, len(names), note, file=out)
            elif fmt == "markdown":
                out.write(markdown(header, rows, len(names)))
            else:
                write_csv(header, rows, out)
        if fmt != "rich":
            print(note, file=sys.stderr)
        if plots:
            labels = [", ".join([run_name(r), *origin(r), *(f"{k}={r.data.params[k]}" for k in params[:3]
                                                            if k in r.data.params)]) for r in runs]
            plot_metrics(client, runs, plots, labels).savefig(plot_file, dpi=120)
            print(f"wrote {plot_file}", file=sys.stderr)
    except MlflowException as err:
        raise CompareError(err.message.splitlines()[0]) from err
