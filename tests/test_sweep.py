"""Hydra sweeps of a stage: basic and Optuna multiruns, the summary table, unique folders, the objective's errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONF, TINY

LLMSTAGES = str(Path(sys.executable).parent / "llmstages")


def llmstages(args: list[str], cwd: Path, popen: bool = False):
    """Run (or, with ``popen``, start) the CLI in ``cwd`` as a user does; returns the CompletedProcess / Popen."""
    env = {**os.environ, "LLMSTAGES_CONF": str(CONF)}
    if popen:
        return subprocess.Popen([LLMSTAGES, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run([LLMSTAGES, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def pretrain_args(work: Path) -> list[str]:
    """A pretrain of a few steps on the tiny pipeline's data, no tracker; the learning rate is left to the sweeps."""
    tiny = [a for a in TINY["pretrain"] if not a.startswith("optim.lr=")]
    return [f"data_dir={work}/outputs/data", "logger=none", *tiny, "trainer.max_steps=3",
            "trainer.val_check_interval=3", "optim.warmup_steps=1"]


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{' '.join(p.args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def sweep_dirs(cwd: Path, stage: str = "pretrain") -> list[Path]:
    return sorted(p for p in (cwd / "outputs/multirun" / stage).glob("*") if p.is_dir())


def summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def job_metrics(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def test_basic_multirun_summary(tiny_run, tmp_path):
    """Two learning rates: two job folders with their own lr, and a summary whose values are the jobs' val_loss."""
    work, _ = tiny_run
    args = [a if a != "logger=none" else "logger=mlflow" for a in pretrain_args(work)]
    p = ok(llmstages(["pretrain", "-m", "optim.lr=1e-3,3e-3", *args], tmp_path))
    [sweep] = sweep_dirs(tmp_path)
    metrics = job_metrics(sweep)
    assert sorted(metrics) == [0, 1]
    lrs = {n: yaml.safe_load((sweep / str(n) / "config.yaml").read_text())["optim"]["lr"] for n in metrics}
    assert lrs == {0: 1e-3, 1: 3e-3}
    rows = summary(sweep)
    assert [r["job"] for r in rows] == ["0", "1"] and [float(r["optim.lr"]) for r in rows] == [1e-3, 3e-3]
    assert "trainer.max_steps" not in rows[0]  # only the overrides that differ between jobs
    for r in rows:
        assert float(r["val_loss"]) == metrics[int(r["job"])]["val_loss"] and r["status"] == "ok"
        assert Path(r["folder"]) == sweep / r["job"]
    best = min(metrics, key=lambda n: metrics[n]["val_loss"])
    assert [r["job"] for r in rows if r["best"] == "*"] == [str(best)]
    md = (sweep / "summary.md").read_text()
    assert "| job | optim.lr | val_loss | best | status | folder |" in md and md.count("| * |") == 1
    assert "sweep: 2 jobs, val_loss (minimize)" in p.stderr and "summary.md" in p.stderr

    # MLflow: one run per job, tagged with the sweep folder and job number, nested under one sweep parent run;
    # `llmstages compare` on that tag shows the two runs with the lr that differs and the same val_loss.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    rel = sweep.relative_to(tmp_path)  # the tag is the sweep folder as configured (hydra.sweep.dir)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.sweep = '{rel}'")
    [parent] = [r for r in runs if r.data.tags.get("llmstages_role") == "sweep"]
    jobs = {int(r.data.tags["sweep_job"]): r for r in runs if r is not parent}
    assert sorted(jobs) == [0, 1] and parent.info.run_name == f"sweep-{sweep.name}"
    for n, r in jobs.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.run_name == f"pretrain-{sweep.name}-job{n}"
        assert float(r.data.params["optim.lr"]) == lrs[n]
        assert r.data.metrics["val_loss"] == pytest.approx(metrics[n]["val_loss"], rel=1e-6)
    table = ok(llmstages(["compare", "--tracking-uri", f"sqlite:///{tmp_path}/outputs/mlflow.db", "--tag",
                          f"sweep={rel}", "--format", "csv"], tmp_path)).stdout
    got = list(csv.DictReader(table.splitlines()))
    assert {(float(r["optim.lr"]), float(r["val_loss"])) for r in got} == \
        {(lrs[n], metrics[n]["val_loss"]) for n in metrics}


def test_optuna_preset_three_trials(tiny_run, tmp_path):
    """hparams_search=pretrain_optuna is a multirun without -m; the summary's best is Optuna's best and the minimum."""
    work, _ = tiny_run
    ok(llmstages(["pretrain", "hparams_search=pretrain_optuna", "hydra.sweeper.n_trials=3", *pretrain_args(work)],
                 tmp_path))
    [sweep] = sweep_dirs(tmp_path)
    metrics = job_metrics(sweep)
    assert sorted(metrics) == [0, 1, 2]
    lowest = min(m["val_loss"] for m in metrics.values())
    rows = summary(sweep)
    [best] = [r for r in rows if r["best"] == "*"]
    assert float(best["val_loss"]) == lowest == metrics[int(best["job"])]["val_loss"]
    assert {"optim.lr", "optim.weight_decay"} <= set(rows[0])  # the searched parameters
    assert "optim.warmup_steps" not in rows[0]  # fixed on the command line: not searched
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(lowest)
    chosen = yaml.safe_load((sweep / best["job"] / "config.yaml").read_text())["optim"]
    assert result["best_params"]["optim.lr"] == pytest.approx(chosen["lr"])
    assert 1e-4 <= chosen["lr"] <= 1e-2


def test_concurrent_runs_get_their_own_folders(tiny_run, tmp_path):
    """Two sweeps and two ad-hoc runs, each pair started at the same moment in the same folder, never share one."""
    work, _ = tiny_run
    procs = [llmstages(["pretrain", "-m", f"optim.lr={lr}", *pretrain_args(work)], tmp_path, popen=True)
             for lr in ("1e-3", "2e-3")]
    # ad-hoc runs that stop at once (a bad value) still get their run folder first
    procs += [llmstages(["pretrain", "objective.direction=up", "logger=none"], tmp_path, popen=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs[:2]] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    sweeps = sweep_dirs(tmp_path)
    assert len(sweeps) == 2
    lrs = set()
    for sweep in sweeps:
        [row] = summary(sweep)
        assert Path(row["folder"]) == sweep / "0" and (sweep / "0/metrics.json").is_file()
        lrs.add(yaml.safe_load((sweep / "0/config.yaml").read_text())["optim"]["lr"])
    assert lrs == {1e-3, 2e-3}
    assert len([p for p in (tmp_path / "outputs/runs/pretrain").glob("*") if p.is_dir()]) == 2


def test_failed_job_is_listed_as_failed(tiny_run, tmp_path):
    """A job with a bad value fails alone: the sweep reports it, the summary lists it as failed, the other is best."""
    work, _ = tiny_run
    p = llmstages(["pretrain", "-m", "optim.lr=1e-3,-1", *pretrain_args(work)], tmp_path)
    assert p.returncode != 0  # the basic sweeper re-raises a failed job's error at the end
    [sweep] = sweep_dirs(tmp_path)
    rows = summary(sweep)
    assert [(r["job"], r["best"], r["status"][:7]) for r in rows] == [("0", "*", "ok"), ("1", "", "failed:")]
    assert "optim.lr" in rows[1]["status"] and "must be > 0" in rows[1]["status"] and rows[1]["val_loss"] == ""
    assert "failed: " in p.stderr and "sweep: 2 jobs" in p.stderr


def test_unknown_objective_metric_stops_a_sweep_and_warns_a_single_run(tiny_run, tmp_path):
    work, _ = tiny_run
    p = llmstages(["pretrain", "-m", "objective.metric=val_los", *pretrain_args(work)], tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    [line] = [ln for ln in p.stderr.splitlines() if "objective.metric" in ln]
    assert "'val_los'" in line and "val_loss" in line and "val_perplexity" in line
    # A single run does not use the objective: it ends well, its output written, with a warning.
    p = ok(llmstages(["pretrain", "objective.metric=val_los", "out_dir=outputs/one", *pretrain_args(work)], tmp_path))
    [line] = [ln for ln in p.stderr.splitlines() if "objective.metric" in ln]
    assert line.startswith("llmstages pretrain: warning: objective.metric='val_los' is not a metric of") \
        and "val_perplexity" in line
    assert (tmp_path / "outputs/one/model.safetensors").is_file()
    p = llmstages(["pretrain", "objective.direction=lower", "logger=none"], tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "objective.direction" in p.stderr and "'lower'" in p.stderr


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_preset_composes(preset):
    """Each preset selects Optuna in multirun mode with the stage's direction, over keys the stage has."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import llmstages.sweep  # noqa: F401  (the ${llmstages.uid:} resolver of the folders)
    from llmstages.config import validate

    stage = preset.split("_")[0]
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose(config_name=f"entry/{stage}", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    assert "optuna" in cfg.hydra.sweeper._target_ and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.direction == cfg.objective.direction and cfg.hydra.sweeper.sampler.seed is not None
    assert cfg.hydra.sweep.dir.startswith(f"outputs/multirun/{stage}/")
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{preset} searches {key}, which {stage} does not have"
    validate(stage, cfg)


def test_summary_best_by_direction_skips_failed_and_nan(tmp_path):
    from llmstages.sweep import Job, SweepSummary

    s = SweepSummary(sweep_dir=tmp_path, metric="exact_match", direction="maximize")
    s.jobs = [Job(0, ["lr=1", "seed=1"], 0.5, "a"), Job(2, ["lr=3", "seed=1"], None, "c", "boom"),
              Job(1, ["lr=2", "seed=1"], math.nan, "b"), Job(3, ["lr=4", "seed=1"], 0.7, "d")]
    header, rows = s.rows()
    assert header == ["job", "lr", "exact_match", "best", "status", "folder"]
    assert [r[:5] for r in rows] == [["0", "1", "0.5", "", "ok"], ["1", "2", "nan", "", "ok"],
                                     ["2", "3", "", "", "failed: boom"], ["3", "4", "0.7", "*", "ok"]]
    s.direction = "minimize"
    assert s.best().num == 0
    s.write()
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "job,lr,exact_match,best,status,folder"
