"""Experiment tracking: Lightning loggers for MLflow (local store), W&B (offline without a key) and CSV.

Every stage run is tagged with ``pipeline_run`` (one value per ``dvc repro`` execution, so the runs of one
pipeline execution can be compared together), ``stage``, and the git commit; W&B runs are grouped by it.

Lineage (:func:`lineage_tags`): package versions, the MD5 of every input file (the hash DVC records for a file)
combined into ``inputs_md5``, and, for each input folder that another tracked run wrote, that run's id as
``upstream_run_id``: a run's ``output_md5`` tag is the same combined hash over its output folder, so a stage
finds the run that produced its inputs by content, whatever the folder is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import uuid
from pathlib import Path


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


def git_commit() -> tuple[str, bool]:
    """``(commit sha or "unknown", dirty)`` of the working tree."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes (what DVC records for a file output)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_md5s(paths: list[str | Path]) -> dict[str, str]:
    """``{file path: md5}`` for the given files and every file below the given folders (sorted)."""
    out = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out.update({str(f): file_md5(f) for f in files})
    return out


def combined_md5(md5s: dict[str, str], root: str | Path | None = None) -> str:
    """One MD5 over ``(path relative to root, md5)`` pairs: equal for equal content under any folder name."""
    rel = sorted((str(Path(f).relative_to(root)) if root else f, h) for f, h in md5s.items())
    return hashlib.md5(json.dumps(rel).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("llmstages", "torch", "lightning", "tokenizers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def lineage_tags(inputs: list[str | Path], tracking_uri: str | None) -> tuple[dict[str, str], dict]:
    """Tags ``version.<package>``, ``inputs_md5`` and ``upstream_run_id`` (comma-separated when several), and
    the full record (per-file MD5s, versions, upstream run per input folder) for a ``lineage.json`` artifact.

    The upstream run is looked up in the MLflow store at ``tracking_uri`` (skipped when None or unreachable).
    """
    md5s = tree_md5s(inputs)
    versions = package_versions()
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    digests = {str(d): combined_md5({f: h for f, h in md5s.items() if Path(f).is_relative_to(d)}, d) for d in folders}
    found = _runs_with_outputs(tracking_uri, set(digests.values())) if tracking_uri and digests else {}
    upstream = {folder: found[d] for folder, d in digests.items() if d in found}
    tags = {**{f"version.{k}": v for k, v in versions.items()}, "inputs_md5": combined_md5(md5s)}
    if upstream:
        tags["upstream_run_id"] = ",".join(upstream.values())
    return tags, {"inputs": md5s, "versions": versions, "upstream_runs": upstream}


def _runs_with_outputs(tracking_uri: str, digests: set[str]) -> dict[str, str]:
    """``{digest: id of the newest run tagged output_md5 = digest}`` from one client of the MLflow store."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        found = {}
        for d in sorted(digests) if exps else []:
            runs = client.search_runs(exps, f"tags.output_md5 = '{d}'", order_by=["attributes.start_time DESC"],
                                      max_results=1)
            if runs:
                found[d] = runs[0].info.run_id
        return found
    except Exception:  # noqa: BLE001  (lineage is best effort: a broken store must not stop training)
        return {}


def make_loggers(backends: list[str], *, stage: str, run_name: str, tags: dict[str, str], experiment: str,
                 mlflow_tracking_uri: str, mlflow_artifact_location: str, wandb_project: str,
                 wandb_mode: str | None, wandb_dir: str, csv_dir: str) -> list:
    """Lightning loggers for the requested backends (``mlflow``, ``wandb``, ``csv``).

    W&B runs offline unless ``wandb_mode`` says otherwise or ``WANDB_API_KEY`` is set; offline runs land in
    ``<wandb_dir>/wandb/`` and are uploaded later with ``wandb sync``.
    """
    loggers = []
    for backend in backends:
        if backend == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            _ensure_sqlite_parent(mlflow_tracking_uri)
            loggers.append(MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=mlflow_tracking_uri,
                                        tags=tags, artifact_location=str(Path(mlflow_artifact_location).resolve())))
        elif backend == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            mode = wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(project=wandb_project, name=run_name, group=tags.get("pipeline_run"),
                                       job_type=stage, tags=[stage], save_dir=wandb_dir, mode=mode))
        elif backend == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=csv_dir, name=stage, version=run_name))
        else:
            raise ValueError(f"logger.backends: unknown backend {backend!r}")
    return loggers


def _ensure_sqlite_parent(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def log_summary(loggers: list, metrics: dict[str, float], artifacts: list[Path]) -> None:
    """Log final metrics to every logger and files as MLflow artifacts / W&B summary."""
    for lg in loggers:
        lg.log_metrics({f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        name = type(lg).__name__
        if name == "MLFlowLogger":
            for f in artifacts:
                if Path(f).exists():
                    lg.experiment.log_artifact(lg.run_id, str(f))
        elif name == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        lg.finalize("success")
