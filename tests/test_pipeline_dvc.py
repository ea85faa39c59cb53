"""The whole pipeline through DVC in a temporary git + DVC repo, on the tiny experiment preset.

Checks: `dvc repro` runs the five stages; a second `dvc repro` runs nothing; `dvc exp run -S` with an SFT
setting reruns sft, reward and rlhf only, and the sft stage trained with the value that was set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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
