"""Lineage of a stage run: package versions, the MD5 of every input file (the hash DVC records for a file)
combined into ``inputs_md5``, and, for each input folder that another tracked run wrote, that run's id as
``upstream_run_id``: a run's ``output_md5`` tag is the same combined hash over its output folder, so a stage
finds the run that produced its inputs by content, whatever the folder is called.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path


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
    """``{digest: id of the newest run tagged output_md5 = digest}`` from the MLflow store at ``tracking_uri``,
    read in the MLflow process (:mod:`llmstages.mlflow_process`)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return {}
    from . import mlflow_process
    from .tracking import absolute_uri

    try:
        return mlflow_process.call(absolute_uri(tracking_uri), _newest_runs, sorted(digests))
    except Exception:  # noqa: BLE001  (lineage is best effort: a broken store must not stop training)
        return {}


def _newest_runs(client, digests: list[str]) -> dict[str, str]:
    exps = [e.experiment_id for e in client.search_experiments()]
    found = {}
    for d in digests if exps else []:
        runs = client.search_runs(exps, f"tags.output_md5 = '{d}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            found[d] = runs[0].info.run_id
    return found
