"""The whole pipeline through DVC in a temporary git + DVC repo, on the tiny experiment preset.

Checks: `dvc repro` runs the five stages; a second `dvc repro` runs nothing; each training stage's curves are
DVC plots with the values it logged; `dvc exp run -S` with an SFT setting reruns sft, reward and rlhf only, and
the sft stage trained with the value that was set; a queued learning-rate grid runs with `dvc queue start` and
logs to the project's own MLflow store, tagged with the experiment names.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def curve(repo: Path, stage: str, name: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric curve of a stage output (``outputs/<stage>/curves/<name>.tsv``)."""
    with open(repo / f"outputs/{stage}/curves/{name}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows and list(rows[0]) == ["step", name.split("/")[-1]]
    return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in rows]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("conf", "src", "dvc.yaml", ".gitignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    (repo / "outputs").mkdir()
    (repo / "outputs/.gitkeep").touch()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.name", "llmstages-test")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "hydra.enabled", "True")
    sh(repo, "llmstages", "params", "+experiment=tiny")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny pipeline")
    return repo


def test_repro_runs_all_stages_then_nothing(repo):
    log = sh(repo, "dvc", "repro")
    assert ran_stages(log) == ["data", "pretrain", "sft", "reward", "rlhf"]
    assert re.search(r"rlhf \(ppo\) time: generation [\d.]+ s \(\d+%\), scoring .*, optimisation", log)
    for stage in ("data", "pretrain", "sft", "reward", "rlhf"):
        assert json.loads((repo / f"outputs/{stage}/metrics.json").read_text())
    assert ran_stages(sh(repo, "dvc", "repro")) == []
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")


def test_training_curves_are_dvc_plots(repo):
    """Each training stage writes what it logged as curves in its output; `dvc plots show` charts them by step."""
    metrics = {s: json.loads((repo / f"outputs/{s}/metrics.json").read_text()) for s in ("pretrain", "sft", "reward")}
    train_loss = curve(repo, "pretrain", "train/lm_loss")
    steps = [s for s, _ in train_loss]
    assert len(steps) >= 2 and steps == sorted(set(steps))  # one point per logged step
    assert train_loss[-1][1] == pytest.approx(metrics["pretrain"]["train_loss"], abs=1e-6)
    # metrics.json re-evaluates in float32; the Trainer's validation may run under bf16 autocast
    assert curve(repo, "pretrain", "val/lm_loss")[-1][1] == pytest.approx(metrics["pretrain"]["val_loss"], rel=1e-2)
    lr = yaml.safe_load((repo / "outputs/pretrain/config.yaml").read_text())["optim"]["lr"]
    assert all(0 < v <= lr * (1 + 1e-6) for _, v in curve(repo, "pretrain", "train/lr"))
    assert curve(repo, "sft", "val/lm_loss")[-1][1] == pytest.approx(metrics["sft"]["val_loss"], abs=1e-6)
    for name in ("bt_loss", "accuracy", "margin"):  # the final full validation is the last point
        want = metrics["reward"][f"val_{name.removeprefix('bt_')}"]
        assert curve(repo, "reward", f"val/{name}")[-1][1] == pytest.approx(want, abs=1e-6)
    assert len(curve(repo, "rlhf", "train/reward")) >= 1  # manual optimization (PPO)

    shown = json.loads(subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=repo, capture_output=True,
                                      text=True, check=True).stdout)["data"]
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        files = sorted(str(f.relative_to(repo)) for f in (repo / f"outputs/{stage}/curves").rglob("*.tsv"))
        assert files and set(files) <= set(shown), stage
    both = shown["pretrain: causal LM loss, train and validation"][0]["content"]  # train and val on one chart
    assert {p["filename"] for p in both["data"]["values"]} == {"train/lm_loss.tsv", "val/lm_loss.tsv"}
    assert both["encoding"]["x"]["title"] == "optimizer step"
    assert both["layer"][0]["encoding"]["y"]["title"] == "cross-entropy (nats/token)"
    plot = shown["outputs/pretrain/curves/val/lm_loss.tsv"][0]["content"]
    assert plot["encoding"]["x"]["field"] == "step"
    assert [float(p["lm_loss"]) for p in plot["data"]["values"]] == [v for _, v in curve(repo, "pretrain", "val/lm_loss")]
    # DVCLive wrote only the stage outputs: no dvclive/ folder, no dvc.yaml edit, nothing new for git
    assert not (repo / "dvclive").exists() and sh(repo, "git", "status", "--porcelain") == ""


def test_exp_run_sft_setting_reruns_downstream_only(repo):
    log = sh(repo, "dvc", "exp", "run", "-S", "+experiment=tiny", "-S", "sft.optim.lr=0.0001234")
    assert ran_stages(log) == ["sft", "reward", "rlhf"]
    used = yaml.safe_load((repo / "outputs/sft/config.yaml").read_text())
    assert used["optim"]["lr"] == pytest.approx(0.0001234)
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    text = json.dumps(json.loads(shown.stdout))  # both experiments, with their params and metrics
    assert "0.0001234" in text and "exact_match" in text and "val_accuracy" in text


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_exp_run_switches_the_rlhf_algorithm_with_one_value(repo, algorithm):
    log = sh(repo, "dvc", "exp", "run", "-S", "+experiment=tiny", "-S", f"rlhf.algorithm={algorithm}")
    assert ran_stages(log) == ["rlhf"]
    metrics = json.loads((repo / "outputs/rlhf/metrics.json").read_text())
    assert metrics["algorithm"] == algorithm and metrics["steps"] == 8


def test_queued_lr_grid_runs_with_dvc_queue_start(repo):
    """`dvc exp run --queue` with a list of values queues one experiment per value; `dvc queue start` runs them
    (each in a temporary copy of the repo); `dvc exp show` and `dvc plots diff` compare them, and their MLflow runs
    land in the project's own store, tagged with the experiment names."""
    log = sh(repo, "dvc", "exp", "run", "--queue", "pretrain", "-S", "+experiment=tiny",
             "-S", "pretrain.optim.lr=0.002,0.0003")
    names = re.findall(r"Queued experiment '([\w-]+)'", log)
    assert len(names) == 2, log
    try:
        sh(repo, "dvc", "queue", "start", "-j", "1")
        deadline = time.time() + 600
        while re.search(r"\b(Queued|Running)\b", status := sh(repo, "dvc", "queue", "status")):
            assert time.time() < deadline, status
            time.sleep(2)
    finally:
        subprocess.run([str(BIN / "dvc"), "queue", "stop"], cwd=repo, capture_output=True)
    for name in names:
        assert re.search(rf"{name}\s.*Success", status), sh(repo, "dvc", "queue", "logs", name)

    shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True,
                                      text=True, check=True).stdout)
    exps = {e["name"]: e["revs"][0]["data"] for rev in shown for e in rev.get("experiments") or []
            if e.get("name") in names}
    lrs = {n: d["params"]["params.yaml"]["data"]["pretrain"]["optim"]["lr"] for n, d in exps.items()}
    assert sorted(lrs.values()) == [0.0003, 0.002]
    for data in exps.values():  # each ran data + pretrain and shows the params and metrics of all five stages
        stages = {"data", "pretrain", "sft", "reward", "rlhf"}
        assert {m.split("/")[1] for m in data["metrics"]} == stages <= set(data["params"]["params.yaml"]["data"])
        assert data["metrics"]["outputs/pretrain/metrics.json"]["data"]["val_loss"] > 0

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'")
    used = {r.data.tags.get("dvc_exp_name"): float(r.data.params["optim.lr"]) for r in runs
            if r.data.tags.get("dvc_exp_name") in names and r.info.status == "FINISHED"}
    assert used == lrs  # the value each experiment set is the one its pretrain run trained with
    for r in runs:  # the commit as MLflow's own tag (the runs table's Version column); the description names the exp
        assert r.data.tags["mlflow.source.git.commit"] == r.data.tags["git_commit"] != "unknown"
        if r.data.tags.get("dvc_exp_name") in names:
            assert f"DVC experiment {r.data.tags['dvc_exp_name']}" in r.data.tags["mlflow.note.content"]

    diff = json.loads(subprocess.run([str(BIN / "dvc"), "plots", "diff", "--json", *names], cwd=repo,
                                     capture_output=True, text=True, check=True).stdout)["data"]
    values = diff["outputs/pretrain/curves/val/lm_loss.tsv"][0]["content"]["data"]["values"]
    assert {p["rev"] for p in values} == set(names)


def import_closure(module: Path) -> set[Path]:
    """The files of ``src/llmstages`` that importing ``module`` runs: its ``llmstages`` imports (relative or
    absolute, at module level or inside functions), the packages on their way, and theirs, recursively."""
    src = ROOT / "src"

    def file_of(name: str) -> Path | None:
        p = src.joinpath(*name.split("."))
        return p / "__init__.py" if (p / "__init__.py").is_file() else p.with_suffix(".py") if \
            p.with_suffix(".py").is_file() else None

    seen, todo = set(), [module]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        parts = list(f.relative_to(src).with_suffix("").parts)
        package = parts[:-1]  # a module's package; for a package's __init__, the package itself
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for name in (n for n in names if n.split(".")[0] == "llmstages"):
                bits = name.split(".")
                todo += [p for i in range(1, len(bits) + 1) if (p := file_of(".".join(bits[:i]))) is not None]
    return seen


def test_each_stage_depends_on_every_source_file_it_imports():
    """dvc.yaml's deps list, for each stage, every file of the package its module imports (a dep may be a folder
    holding it), so that a change there reruns the stage; and every listed source path exists."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"data", "pretrain", "sft", "reward", "rlhf"}
    for name, stage in stages.items():
        deps = [ROOT / d for d in stage["deps"] if d.startswith("src/")]
        assert all(d.exists() for d in deps), [str(d) for d in deps if not d.exists()]
        closure = import_closure(ROOT / "src/llmstages/stages" / f"{name}.py")
        missing = sorted(str(f.relative_to(ROOT)) for f in closure
                         if not any(f == d or d in f.parents for d in deps))
        assert not missing, f"dvc.yaml: stage {name} does not list {missing} among its deps"
    assert ROOT / "src/llmstages/rollout.py" in import_closure(ROOT / "src/llmstages/stages/rlhf.py")
    assert ROOT / "src/llmstages/rollout.py" not in import_closure(ROOT / "src/llmstages/stages/sft.py")
