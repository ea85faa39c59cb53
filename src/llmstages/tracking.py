"""Experiment tracking: Lightning loggers for MLflow (local store), W&B (offline without a key) and CSV.

Every stage run is tagged with ``pipeline_run`` (one value per ``dvc repro`` execution, so the runs of one
pipeline execution can be compared together), ``stage``, and the git commit; W&B runs are grouped by it.

Lineage tags come from :mod:`llmstages.lineage`.

One pipeline execution (a ``dvc repro`` or ``dvc exp run``) is one MLflow parent run (tag
``llmstages_role=pipeline``) with a nested run per stage, and one W&B group with a job type per stage; the
jobs of one Hydra sweep are nested the same way under a ``sweep`` parent run.
Relative store paths are taken from the DVC project root (``$DVC_ROOT``), so experiments that DVC runs in a
temporary copy of the repo (``dvc queue start``) log to the project's own store.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

log = logging.getLogger("llmstages")


def _proc_parent(pid: int) -> tuple[int, str, str] | None:
    """``(parent pid, start time in clock ticks, cmdline)`` of a Linux process, or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return int(fields[1]), fields[19], cmd
    except (OSError, ValueError, IndexError):
        return None


def pipeline_run_id() -> str:
    """An id shared by the stages of one pipeline execution.

    ``LLMSTAGES_PIPELINE_RUN`` if set; otherwise derived from the ``dvc`` process that started this stage
    (its pid and start time), so all stages of one ``dvc repro`` share it; otherwise a fresh id.
    """
    if os.environ.get("LLMSTAGES_PIPELINE_RUN"):
        return os.environ["LLMSTAGES_PIPELINE_RUN"]
    pid = os.getppid()
    for _ in range(6):
        info = _proc_parent(pid)
        if info is None or pid <= 1:
            break
        ppid, start, cmd = info
        if "dvc" in cmd.split(" ")[0] or " dvc " in f" {cmd} " or "/dvc " in cmd:
            return uuid.uuid5(uuid.NAMESPACE_OID, f"{socket.gethostname()}-{pid}-{start}").hex[:12]
        pid = ppid
    return uuid.uuid4().hex[:12]


def in_pipeline() -> bool:
    """Whether this stage runs as part of a pipeline execution (under DVC, or with LLMSTAGES_PIPELINE_RUN set)."""
    return bool(os.environ.get("DVC_STAGE") or os.environ.get("LLMSTAGES_PIPELINE_RUN"))


def git_commit() -> tuple[str, bool]:
    """``(commit sha or "unknown", dirty)`` of the working tree.

    ``params.yaml`` and ``dvc.lock`` do not count as dirty: DVC writes them itself on ``dvc exp run -S``, and
    the values a run used are logged with it anyway.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)params.yaml", ":(exclude)dvc.lock"], capture_output=True,
                                    text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def project_path(path: str) -> str:
    """``path`` (a folder or a ``sqlite:///`` URI) with a relative location taken from ``$DVC_ROOT`` when DVC
    runs the stage, else unchanged.

    A queued DVC experiment runs in a temporary copy of the repo that is deleted afterwards; its tracking runs
    must still land in the project's ``outputs/mlflow.db`` and ``outputs/wandb``.
    """
    root = os.environ.get("DVC_ROOT")
    prefix = "sqlite:///" if path.startswith("sqlite:///") else ""
    rest = path[len(prefix):]
    if not root or (not prefix and "://" in path) or Path(rest).is_absolute():
        return path
    return prefix + str(Path(root) / rest)


BACKENDS = ("mlflow", "wandb", "csv")  # logger.backends


def make_loggers(backends: list[str], *, stage: str, run_name: str, tags: dict[str, str], experiment: str,
                 mlflow_tracking_uri: str, mlflow_artifact_location: str, wandb_project: str,
                 wandb_mode: str | None, wandb_dir: str, csv_dir: str, parent: tuple[str, str] | None = None,
                 resume: dict[str, str] | None = None, description: str = "") -> list:
    """Lightning loggers for the requested backends (``mlflow``, ``wandb``, ``csv``).

    W&B runs offline unless ``wandb_mode`` says otherwise or ``WANDB_API_KEY`` is set; offline runs land in
    ``<wandb_dir>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``. With ``parent``
    (``("pipeline_run", id)`` or ``("sweep", folder)``), the MLflow run is nested under the parent run of that
    pipeline execution or sweep (see :func:`parent_run`).
    ``resume`` (:func:`run_ids` of an interrupted run of the same stage) continues those tracking runs (and
    the CSV file) instead of opening new ones. ``description``: the MLflow run's description (and W&B notes).
    The MLflow experiment is one of model training (:func:`experiment_id`); the MLflow logger
    (:func:`mlflow_logger`) writes through the MLflow process (:mod:`llmstages.mlflow_process`).

    Raises:
        ValueError: for an unknown backend name.
        llmstages.mlflow_process.MlflowProcessError: when MLflow cannot open the store or the run.
    """
    resume = resume or {}
    loggers = []
    for backend in backends:
        if backend == "mlflow":
            from . import mlflow_process

            uri = project_path(mlflow_tracking_uri)
            artifacts = str(Path(project_path(mlflow_artifact_location)).resolve())
            _ensure_sqlite_parent(uri)
            follow_project(uri, experiment, artifacts)
            run_tags = {**tags, **mlflow_system_tags(tags, description)}
            run_id, exp_id = mlflow_process.call(absolute_uri(uri), _open_run, experiment, artifacts, run_name,
                                                 run_tags, tags, parent, resume.get("mlflow"))
            loggers.append(mlflow_logger(uri, run_id, exp_id))
        elif backend == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            mode = wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            Path(project_path(wandb_dir)).mkdir(parents=True, exist_ok=True)
            extra = {"id": resume["wandb"], "resume": "allow"} if resume.get("wandb") else {}
            import wandb

            if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
                # the run's file is written every second, not every 15: a killed run loses at most that much
                extra["settings"] = wandb.Settings(x_transaction_log_flush_interval=1.0)
            loggers.append(WandbLogger(project=wandb_project, name=run_name, group=tags.get("pipeline_run"),
                                       job_type=stage, tags=[stage], save_dir=project_path(wandb_dir), mode=mode,
                                       notes=description or None, **extra))
        elif backend == "csv":
            from lightning.pytorch.loggers import CSVLogger

            log_dir = Path(resume.get("csv") or Path(csv_dir) / stage / run_name)
            kept = (log_dir / "metrics.csv").read_text(encoding="utf-8") if (log_dir / "metrics.csv").is_file() \
                and resume.get("csv") else None
            # Every logged step is written at once (not every 100), so that a killed run's rows are on disk.
            lg = CSVLogger(save_dir=str(log_dir.parent.parent), name=log_dir.parent.name, version=log_dir.name,
                           flush_logs_every_n_steps=1)
            if kept:  # Lightning's writer deletes an existing metrics.csv: a resumed run appends to it instead
                writer = lg.experiment
                (log_dir / "metrics.csv").write_text(kept, encoding="utf-8")
                writer.metrics_keys = kept.splitlines()[0].split(",")
            loggers.append(lg)
        else:
            raise ValueError(f"logger.backends: unknown backend {backend!r}")
    return loggers


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative ``sqlite:///`` path made absolute (from the working directory); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_absolute():
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


@functools.cache
def _mlflow_run_class() -> type:
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from lightning.pytorch.loggers.logger import Logger
    from lightning.pytorch.utilities import rank_zero_only

    from . import mlflow_process

    class MLflowRun(Logger):
        """Lightning logger of one MLflow run, as Lightning's ``MLFlowLogger`` logs (parameters cut to 250
        characters, in batches of 100; metric names without characters other than letters, digits, ``_/.-``
        and space; a point without a step at step 0), through the MLflow process. Parameters and metrics are
        posted (the step goes on while the store writes them); :meth:`finalize` waits for all of it."""

        def __init__(self, tracking_uri: str, run_id: str, experiment_id: str) -> None:
            super().__init__()
            self.tracking_uri, self.run_id, self.experiment_id = tracking_uri, run_id, experiment_id
            self.store_uri = absolute_uri(tracking_uri)  # the same store if the working directory changes

        def call(self, fn, *args, **kwargs):
            """``fn(client, run_id, *args, **kwargs)`` in the MLflow process (see :func:`mlflow_process.call`)."""
            return mlflow_process.call(self.store_uri, fn, self.run_id, *args, **kwargs)

        def post(self, fn, *args, **kwargs) -> None:
            """:meth:`call` without waiting for it (see :func:`mlflow_process.post`)."""
            mlflow_process.post(self.store_uri, fn, self.run_id, *args, **kwargs)

        @property
        def name(self) -> str:
            return self.experiment_id

        @property
        def version(self) -> str:
            return self.run_id

        @rank_zero_only
        def log_hyperparams(self, params, *args, **kwargs) -> None:
            params = _flatten_dict(_convert_params(params))
            self.post(_log_batch, params={k: str(v)[:250] for k, v in params.items()})

        @rank_zero_only
        def log_metrics(self, metrics, step: int | None = None) -> None:
            clean = {}
            for k, v in metrics.items():
                if isinstance(v, str):
                    log.warning("Discarding metric with string value %s=%s.", k, v)
                    continue
                new_k = re.sub("[^a-zA-Z0-9_/. -]+", "", k)
                if new_k != k:
                    log.warning("MLflow only allows '_', '/', '.' and ' ' special characters in metric names: "
                                "%s is logged as %s.", k, new_k)
                clean[new_k] = float(v)
            self.post(_log_batch, metrics=clean, step=step or 0, timestamp_ms=int(time.time() * 1000))

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            self.call(_terminate, {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(
                status, status))

    return MLflowRun


def mlflow_logger(tracking_uri: str, run_id: str, experiment_id: str):
    """The Lightning logger of the MLflow run ``run_id`` (class ``MLflowRun``): its client lives in the MLflow
    process (:mod:`llmstages.mlflow_process`), so this process never imports MLflow. ``lg.call(fn, *args)``
    runs ``fn(client, run_id, *args)`` there."""
    return _mlflow_run_class()(tracking_uri, run_id, experiment_id)


def _is_mlflow(lg) -> bool:
    return type(lg).__name__ == "MLflowRun"


# ---- run in the MLflow process (llmstages.mlflow_process): each takes its MlflowClient first, returns plain data

def _open_run(client, experiment: str, artifacts: str, run_name: str, run_tags: dict[str, str],
              stage_tags: dict[str, str], parent: tuple[str, str] | None, resume_id: str | None) -> tuple[str, str]:
    """``(run id, experiment id)`` of the stage's run: ``resume_id`` marked RUNNING again, or a new run named
    ``run_name`` with ``run_tags`` and MLflow's context tags (user, source), nested under ``parent``."""
    from mlflow.tracking.context.registry import resolve_tags

    exp_id = experiment_id(client, experiment, artifacts)
    if resume_id:
        client.update_run(resume_id, status="RUNNING")
        return resume_id, client.get_run(resume_id).info.experiment_id
    tags = dict(run_tags)
    if parent:
        tags["mlflow.parentRunId"] = parent_run(client, exp_id, *parent, stage_tags)
    tags["mlflow.runName"] = run_name
    return client.create_run(exp_id, tags=resolve_tags(tags)).info.run_id, exp_id


def _log_batch(client, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
               step: int = 0, timestamp_ms: int = 0) -> None:
    from mlflow.entities import Metric, Param

    items = [Param(k, v) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=items[i:i + 100])
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, v, timestamp_ms, step) for k, v in metrics.items()])


def _terminate(client, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status)


def _set_tag(client, run_id: str, key: str, value: str) -> None:
    client.set_tag(run_id, key, value)


# The columns of MLflow's SQL store that hold artifact locations (MLflow 2.x-3.x schema).
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location"))


def follow_project(uri: str, experiment: str, artifacts: str) -> int:
    """Point the artifact locations of ``experiment`` in the local SQLite store ``uri`` at ``artifacts`` (the
    configured folder, resolved in this project) when they name another folder: MLflow stores them as
    absolute paths, so a copied, cloned or moved project would otherwise keep reading and writing the old
    folder's artifacts. Returns the number of rows changed (0 for other stores, or when nothing moved)."""
    import sqlite3

    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or not path.is_file():
        return 0
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        old = row[0] if row else None
        if not old or old.removeprefix("file://") == artifacts:
            return 0
        changed = 0
        for table, column in ARTIFACT_COLUMNS:
            if table in tables:
                changed += db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ? "
                    f"AND (length({column}) = ? OR substr({column}, ?, 1) = '/')",
                    (artifacts, len(old) + 1, len(old), old, len(old), len(old) + 1)).rowcount
    return changed


def experiment_id(client, name: str, artifacts: str) -> str:
    """Id of the MLflow experiment ``name`` (created with its artifacts under ``artifacts`` if missing), tagged
    as a model-training experiment (``mlflow.experimentKind = custom_model_development``: the UI opens it in
    its training view, not the GenAI one)."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifacts)
    if exp is None or exp.tags.get("mlflow.experimentKind") != "custom_model_development":
        client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


def mlflow_system_tags(tags: dict[str, str], description: str = "") -> dict[str, str]:
    """MLflow's own tags for a run of llmstages: the git commit (``mlflow.source.git.commit``: the runs
    table's Version column), the source (``llmstages <stage>``, a local job) and the description
    (``mlflow.note.content``)."""
    out = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"llmstages {tags.get('stage', '')}".strip()}
    if tags.get("git_commit", "unknown") != "unknown":
        out["mlflow.source.git.commit"] = tags["git_commit"]
    if description:
        out["mlflow.note.content"] = description
    return out


def start_system_metrics(loggers: list, interval_s: float) -> list:
    """Start MLflow's system-metrics sampler (CPU and memory use, GPU where one is present; the run page's
    System metrics tab) on each MLflow run of ``loggers``, every ``interval_s`` seconds, in the MLflow process;
    returns those loggers for :func:`stop_system_metrics`. Nothing where MLflow lacks it (``psutil`` missing)."""
    return [lg for lg in loggers if _is_mlflow(lg) and lg.call(_start_sampler, interval_s)]


def stop_system_metrics(monitors: list) -> None:
    """Stop the samplers of :func:`start_system_metrics` (their last samples are written)."""
    while monitors:
        monitors.pop().call(_stop_sampler)


_SAMPLERS: dict = {}  # in the MLflow process: run id -> MLflow's SystemMetricsMonitor


def _start_sampler(client, run_id: str, interval_s: float) -> bool:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return False
    for name in ("mlflow.system_metrics.system_metrics_monitor", "mlflow.system_metrics.metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)  # not an INFO line at each start and stop
    _SAMPLERS[run_id] = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                             tracking_uri=client.tracking_uri)
    _SAMPLERS[run_id].start()
    return True


def _stop_sampler(client, run_id: str) -> None:
    if run_id in _SAMPLERS:
        _SAMPLERS.pop(run_id).finish()


def where_tracked(loggers: list) -> list[str]:
    """One line per tracker saying where this run is recorded and how to look at it."""
    lines = []
    for lg in loggers:
        kind = type(lg).__name__
        if kind == "MLflowRun":
            lines.append(lg.call(_where, lg.tracking_uri))
        elif kind == "WandbLogger":
            run = lg.experiment
            where = f"offline (upload: wandb sync {Path(run.dir).parent})" if run.offline else run.url
            lines.append(f"W&B run {run.name} ({run.id}), {where}")
        elif kind == "CSVLogger":
            lines.append(f"CSV {Path(lg.log_dir) / 'metrics.csv'}")
    return lines


def _where(client, run_id: str, shown_uri: str) -> str:
    run = client.get_run(run_id)
    return (f"MLflow run {run.info.run_name} in experiment {client.get_experiment(run.info.experiment_id).name!r} "
            f"(browse: mlflow ui --backend-store-uri {shown_uri})")


def run_ids(loggers: list) -> dict[str, str]:
    """``{"mlflow": run id, "wandb": run id, "csv": folder}`` of the tracking runs behind ``loggers`` (for
    resuming them)."""
    out = {}
    for lg in loggers:
        if type(lg).__name__ == "CSVLogger":
            out["csv"] = lg.log_dir
        if _is_mlflow(lg):
            out["mlflow"] = lg.run_id
        elif type(lg).__name__ == "WandbLogger":
            out["wandb"] = lg.experiment.id  # starts the run: its id is only known then
    return out


def parent_run(client, experiment_id: str, key: str, value: str, tags: dict[str, str]) -> str:
    """Id of the MLflow parent run of a group of stage runs: a pipeline execution (``key="pipeline_run"``) or a
    Hydra sweep (``key="sweep"``, the sweep folder). Found by its tags (``llmstages_role``, ``key``), else created
    as ``pipeline-<id>`` / ``sweep-<folder name>``; marked RUNNING while one of its runs is (see
    :func:`end_parent_runs`)."""
    role = "pipeline" if key == "pipeline_run" else key
    found = client.search_runs([experiment_id], f"tags.`{key}` = '{value}' AND tags.llmstages_role = '{role}'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    keep = (key, "git_commit", "git_dirty", "dvc_exp_name", *(("stage",) if role == "sweep" else ()))
    kept = {k: tags[k] for k in keep if k in tags}
    what = (f"DVC experiment {tags['dvc_exp_name']}" if tags.get("dvc_exp_name") else "dvc repro in the workspace") \
        if role == "pipeline" else f"Hydra sweep of the {tags.get('stage', '')} stage in {value}"
    commit = tags.get("git_commit", "unknown")[:7] + (" + uncommitted changes" if tags.get("git_dirty") == "True" else "")
    note = f"{role.capitalize()} run: {what}, commit {commit}. Its stage runs are nested below; the key metric " \
           "of each is logged here as <stage>/<metric>."
    run = client.create_run(experiment_id, run_name=f"{role}-{Path(value).name}",
                            tags={"llmstages_role": role, key: value, **kept,
                                  **mlflow_system_tags({"git_commit": tags.get("git_commit", "unknown")}, note)})
    return run.info.run_id


# The metrics that summarise each stage on its pipeline's parent run (from the stage's metrics.json).
KEY_METRICS = {"pretrain": ("val_loss",), "sft": ("exact_match_arithmetic", "val_loss"),
               "reward": ("val_accuracy",),
               "rlhf": ("rlhf_reward", "rlhf_exact_match_arithmetic", "rlhf_kl_to_ref", "win_rate_vs_sft")}


def summarize_on_parent(client, run_id: str, stage: str, metrics: dict) -> None:
    """Log ``stage``'s key metrics (:data:`KEY_METRICS`) on the pipeline parent run of ``run_id`` as
    ``<stage>/<metric>``, and the RL algorithm as a param, so the runs table and chart view compare pipelines at
    a glance."""
    parent_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    parent = client.get_run(parent_id) if parent_id else None
    if parent is None or parent.data.tags.get("llmstages_role") != "pipeline":
        return  # a sweep's parent: its jobs' values would overwrite one another (the sweep summary has them)
    for key in KEY_METRICS.get(stage, ()):
        if isinstance(metrics.get(key), (int, float)):
            client.log_metric(parent_id, f"{stage}/{key}", float(metrics[key]))
    if stage == "rlhf" and metrics.get("algorithm") and "rlhf.algorithm" not in parent.data.params:
        client.log_param(parent_id, "rlhf.algorithm", str(metrics["algorithm"]))


def log_datasets(loggers: list, files: dict[str, str]) -> None:
    """Record each input file (``{path: md5}``, the stage's data) as an MLflow dataset input of the run (the
    Dataset column and lineage views): name = file name, digest = the file's MD5 (as DVC records it), source =
    its path as the stage was given it (relative to the project for the pipeline: a copied project's runs name
    its own files), context ``eval`` for a validation split (``*_val*``, ``val.*``), else ``train``."""
    for lg in loggers:
        if _is_mlflow(lg) and files:
            lg.call(_log_datasets, {str(k): v for k, v in files.items()})


def _log_datasets(client, run_id: str, files: dict[str, str]) -> None:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for path, md5 in sorted(files.items()):
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file either way
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        ds = MetaDataset(source=source, name=Path(path).name, digest=md5[:8])
        name = Path(path).name
        context = "eval" if "_val" in name or name.startswith("val.") else "train"
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def log_model(loggers: list, stage: str, out_dir: Path, output_md5: str, register_as: str | None = None) -> None:
    """Record the stage output as an MLflow logged model of the run (model type = the stage's kind of model),
    with its small files (``config.json``, ``meta.json``, ``metrics.json``) as artifacts; the weights stay in
    ``out_dir``, versioned by DVC (tags ``local_path`` and ``output_md5`` say where and which; ``local_path`` is
    relative to the project, the working directory, when ``out_dir`` lies in it, so a copied or moved project's
    models name its own folders). With ``register_as``, also a new version of that registered model (the final
    policy)."""
    where, project = Path(out_dir).resolve(), Path.cwd().resolve()
    where = where.relative_to(project) if where.is_relative_to(project) else where
    files = [str(Path(out_dir, name).resolve()) for name in ("config.json", "meta.json", "metrics.json")
             if (Path(out_dir) / name).is_file()]
    for lg in loggers:
        if _is_mlflow(lg):
            lg.call(_log_model, stage, where.as_posix(), files, output_md5, register_as)


def _log_model(client, run_id: str, stage: str, local_path: str, files: list[str], output_md5: str,
               register_as: str | None) -> None:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    kind = {"reward": "reward-model"}.get(stage, "causal-lm")
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=stage, source_run_id=run_id,
                                       model_type=kind, tags={"local_path": local_path, "output_md5": output_md5})
    for f in files:
        client.log_model_artifact(model.model_id, f)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if register_as:
        if not client.search_registered_models(f"name = '{register_as}'"):
            client.create_registered_model(register_as, description="The final policy of each llmstages "
                                           "pipeline run (the rlhf stage's output).")
        client.create_model_version(register_as, source=model.artifact_location, run_id=run_id,
                                    model_id=model.model_id, tags={"output_md5": output_md5})


def end_parent_runs(loggers: list, status: str) -> None:
    """Mark the MLflow parent run of each logger's run ``status`` (FINISHED / FAILED) with the current end time."""
    for lg in loggers:
        if _is_mlflow(lg):
            lg.call(_end_parent, status)


def _end_parent(client, run_id: str, status: str) -> None:
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent:
        client.set_terminated(parent, status)


def _ensure_sqlite_parent(uri: str) -> None:
    """Make the folder of a ``sqlite:///`` store.

    Raises:
        ValueError: naming ``logger.mlflow_tracking_uri`` when the folder cannot be made.
    """
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"logger.mlflow_tracking_uri={uri}: cannot make its folder {folder}: "
                             f"{err.strerror or err}") from None


#: numbers of a stage's metrics.json that describe the run rather than measure the model: MLflow tags, not metrics
RUN_FACTS = ("resumed_from_step",)


def log_summary(loggers: list, metrics: dict[str, float], artifacts: list[Path], stage: str = "") -> None:
    """Log a stage's final metrics (its ``metrics.json`` numbers, under the same names) and files: W&B as the
    run summary; MLflow as metrics without a ``/`` (the UI's run page groups them last, after the ``train/``,
    ``val/`` and ``time/`` curves; :data:`RUN_FACTS` as tags) plus the files as artifacts, and the stage's key
    metrics on its parent run (:func:`summarize_on_parent`); CSV as one row."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers:
        name = type(lg).__name__
        if name == "WandbLogger":
            lg.experiment.summary.update(numbers)  # no one-point series: W&B's own place for final values
        else:
            lg.log_metrics({k: v for k, v in numbers.items() if k not in RUN_FACTS})
        if _is_mlflow(lg):
            facts = {key: str(metrics[key]) for key in RUN_FACTS if key in metrics}
            lg.call(_summarize, stage, metrics, facts, [str(Path(f).resolve()) for f in artifacts if Path(f).exists()])
        lg.finalize("success")
    end_parent_runs(loggers, "FINISHED")


def _summarize(client, run_id: str, stage: str, metrics: dict, facts: dict[str, str], files: list[str]) -> None:
    for key, value in facts.items():
        client.set_tag(run_id, key, value)
    for f in files:
        client.log_artifact(run_id, f)
    summarize_on_parent(client, run_id, stage, metrics)


def log_lineage(loggers: list, tags: dict[str, str]) -> None:
    """The run's lineage tags where a backend has no run tags: W&B config keys ``lineage/<tag>`` (MLflow runs
    already carry them as tags, from :func:`make_loggers`)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.config.update({f"lineage/{k}": v for k, v in tags.items()}, allow_val_change=True)


def tag_output(loggers: list, output_md5: str) -> None:
    """Record the combined MD5 of the stage output (what a downstream stage finds as its input,
    :func:`lineage_tags`): MLflow tag ``output_md5``, W&B config key ``lineage/output_md5``."""
    for lg in loggers:
        if _is_mlflow(lg):
            lg.call(_set_tag, "output_md5", output_md5)
        elif type(lg).__name__ == "WandbLogger":
            lg.experiment.config.update({"lineage/output_md5": output_md5}, allow_val_change=True)


def log_table(loggers: list, name: str, rows: list[dict]) -> None:
    """Log ``rows`` (dicts with the same keys) as a table: MLflow artifact ``<name>.json`` (comparable across runs
    in the UI's artifact view), W&B table ``<name>``; the CSV backend has no tables. No rows: nothing logged."""
    if not rows:
        return
    cols = list(rows[0])
    for lg in loggers:
        if _is_mlflow(lg):
            lg.call(_log_table, {c: [r[c] for r in rows] for c in cols}, f"{name}.json")
        elif type(lg).__name__ == "WandbLogger":
            lg.log_table(key=name, columns=cols, data=[[r[c] for c in cols] for r in rows])


def _log_table(client, run_id: str, data: dict[str, list], artifact_file: str) -> None:
    client.log_table(run_id, data=data, artifact_file=artifact_file)


def logged_steps(lg, curves_dir: str | Path) -> dict[str, int] | None:
    """The last step of each metric that the tracker ``lg`` holds from an interrupted run, ``{metric: step}``:
    read from the MLflow run's history, the CSV file, or the DVC curves under ``curves_dir``
    (:func:`curve_logger`'s ``work_dir``); ``None`` for a tracker that cannot be read back here (W&B)."""
    import csv

    last: dict[str, int] = {}
    kind = type(lg).__name__
    if _is_mlflow(lg):
        last = lg.call(_last_steps)
    elif kind == "CSVLogger":
        f = Path(lg.log_dir) / "metrics.csv"
        for r in csv.DictReader(f.read_text(encoding="utf-8").splitlines()) if f.is_file() else []:
            for key, value in r.items():
                if key != "step" and value not in ("", None):
                    last[key] = max(last.get(key, -1), int(r["step"]))
    elif kind == "CurveLogger":
        root = Path(curves_dir) / "plots" / "metrics"
        for f in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
            with open(f, newline="", encoding="utf-8") as fh:
                steps = [int(r["step"]) for r in csv.DictReader(fh, delimiter="\t")]
            if steps:
                last[f.relative_to(root).with_suffix("").as_posix()] = max(steps)
    else:
        return None
    return last


def _last_steps(client, run_id: str) -> dict[str, int]:
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def skip_logged_steps(loggers: list, curves_dir: str | Path) -> None:
    """Make each of ``loggers`` drop a metric at a step it already holds (:func:`logged_steps`).

    A run resumed from its checkpoint at step k repeats the steps between k and the interruption, which its
    trackers already hold with the same values (resume is exact), so each tracker keeps one point per step.
    Each tracker is read on its own (a kill may fall between two trackers' writes); one that cannot be read
    back (W&B) skips what any other holds. Metrics first logged after the resume (the final evaluation, say)
    go through whatever their step.
    """
    own = [logged_steps(lg, curves_dir) for lg in loggers]
    known: dict[str, int] = {}
    for last in own:
        for key, step in (last or {}).items():
            known[key] = max(known.get(key, -1), step)
    for lg, last in zip(loggers, own):
        last = known if last is None else last
        if not last:
            continue

        def only_new(metrics: dict, step: int | None = None, _log=lg.log_metrics, _last=last) -> None:
            new = {k: v for k, v in metrics.items() if step is None or step > _last.get(k, -1)}
            if new:
                _log(new, step)
        lg.log_metrics = only_new


def curve_logger(work_dir: str | Path, out_dir: str | Path, resume: bool):
    """A Lightning logger that writes each metric the stage logs as a DVC plot: ``<out_dir>/curves/<name>.tsv``
    (columns ``step`` and the metric; ``val/lm_loss`` -> ``curves/val/lm_loss.tsv``), through DVCLive.

    DVCLive appends the points under ``work_dir`` (beside the resume checkpoint: DVC deletes a stage's outputs
    before rerunning it, so a resumed run continues its curves from there, ``resume=True``); each time the
    Trainer finalizes its loggers (end of fit or validate, or a failure) they are copied to ``out_dir``, one
    point per step (the latest: a resumed run repeats the steps after its checkpoint, and a final full
    validation replaces the partial one at the same step). DVCLive only writes files here: it opens no DVC repo
    and runs no git (the stage may run inside ``dvc exp run``), writes no dvc.yaml or report, posts nothing to
    DVC Studio, and the metric ``epoch`` that Lightning adds is left out.
    """
    import csv
    import shutil

    from dvclive import Live
    from dvclive.lightning import DVCLiveLogger
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.utilities import rank_zero_only

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:  # instead of opening the DVC repo / git of the working directory
            self._dvc_file = "dvc.yaml"

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update(("start", "data", "done"))

        def post_data_to_studio(self) -> None:
            pass

    def copy_curves(src: Path, dst: Path) -> None:
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.rglob("*.tsv")) if src.is_dir() else []:
            with open(f, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, delimiter="\t")
                rows = {int(r["step"]): r for r in reader}
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            with open(dst / f.relative_to(src), "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, reader.fieldnames, delimiter="\t", lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows[s] for s in sorted(rows))

    class CurveLogger(DVCLiveLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Live:
            if self._experiment is None:
                self._experiment = FilesOnlyLive(**self._kwargs)
            return self._experiment

        @rank_zero_only
        def log_metrics(self, metrics, step: int | None = None, sync: bool = False) -> None:
            live = self.experiment
            live.step = live.step + 1 if step is None else step  # (DVCLive's own method takes 0 for "no step")
            for name, value in metrics.items():
                if name != "epoch":
                    live.log_metric(name, float(value))

        @rank_zero_only
        def finalize(self, status: str) -> None:
            super().finalize(status)
            copy_curves(Path(work_dir) / "plots" / "metrics", Path(out_dir) / "curves")

    return CurveLogger(run_name="", dir=str(work_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)
