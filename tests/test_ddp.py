"""Multi-process (DDP) training as a user starts it: `trainer.devices=2 trainer.strategy=ddp`, two CPU processes
(gloo), from the Hydra command line and from a params file (the DVC path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from conftest import ROOT, TINY

LLMSTAGES = str(Path(sys.executable).parent / "llmstages")
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    return subprocess.run([LLMSTAGES, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{' '.join(p.args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr and "sync_dist" not in p.stderr, p.stderr[-3000:]
    return p


def test_ddp_pretrain_trains_the_model_one_process_trains_with_the_global_batch(tiny_run, tmp_path):
    """Two processes with batch 8 read, together, the windows that one process with batch 16 reads, and average
    their gradients: the two models agree to float rounding. Rank 0 alone tracks (one MLflow run), evaluates and
    writes; tokens_seen counts both processes' tokens."""
    import mlflow

    work, _ = tiny_run
    common = [f"data_dir={work}/outputs/data", *[a for a in TINY["pretrain"] if not a.startswith("batch_size")],
              "trainer.max_steps=6", "trainer.val_check_interval=3", "optim.warmup_steps=2",
              "probes.max_new_tokens=2"]
    ok(run(["pretrain", *common, "batch_size=16", "out_dir=outputs/one", "logger=none"], tmp_path))
    p = ok(run(["pretrain", *common, "batch_size=8", *DDP, "out_dir=outputs/two", "logger=mlflow"], tmp_path))
    out = p.stdout + p.stderr
    assert "Starting with 2 processes" in out
    n_probes = len(yaml.safe_load((ROOT / "conf/probes/default.yaml").read_text())["prompts"])
    assert out.count("pretrain metrics") == 1 and out.count("pretrain probe:") == n_probes  # rank 0 only

    one, two = (load_file(tmp_path / f"outputs/{d}/model.safetensors") for d in ("one", "two"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4
    metrics = json.loads((tmp_path / "outputs/two/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 16 * 64

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [(r.data.tags["stage"], r.info.status) for r in runs] == [("pretrain", "FINISHED")]
    assert runs[0].data.params["trainer.devices"] == "2"


def test_ddp_from_a_params_file_sft_and_ppo(tiny_run, tmp_path):
    """The DVC path (`llmstages <stage> --params params.yaml`): SFT and PPO (manual optimization, rollouts on each
    process) train in two processes and write their outputs; the tracked runs end FINISHED."""
    import mlflow

    work, _ = tiny_run
    params = {
        "sft": {**yaml.safe_load((work / "outputs/sft/config.yaml").read_text()),
                "init_from": f"{work}/outputs/pretrain", "data_dir": f"{work}/outputs/data"},
        "rlhf": {**yaml.safe_load((work / "outputs/rlhf/config.yaml").read_text()),
                 "policy_from": f"{work}/outputs/sft", "reward_from": f"{work}/outputs/reward",
                 "data_dir": f"{work}/outputs/data"},
    }
    for section in params.values():
        section["trainer"].update(devices=2, strategy="ddp", accelerator="cpu")
        section["logger"].update(backends=["mlflow"], mlflow_tracking_uri="sqlite:///outputs/mlflow.db")
    params["sft"]["trainer"]["max_steps"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("sft", "rlhf"):
        p = ok(run([stage, "--params", "params.yaml", "--out", f"outputs/{stage}"], tmp_path))
        assert (p.stdout + p.stderr).count(f"{stage} metrics") == 1
        assert (tmp_path / f"outputs/{stage}/model.safetensors").is_file()
    rl = json.loads((tmp_path / "outputs/rlhf/metrics.json").read_text())
    assert rl["algorithm"] == "ppo" and rl["steps"] == params["rlhf"]["trainer"]["max_steps"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted((r.data.tags["stage"], r.info.status) for r in runs) == [("rlhf", "FINISHED"), ("sft", "FINISHED")]


def test_ddp_in_a_multirun_and_spawned_processes_are_refused_before_training(tiny_run, tmp_path):
    work, _ = tiny_run
    args = [f"data_dir={work}/outputs/data", *TINY["pretrain"], *DDP, "logger=none"]
    p = run(["pretrain", "-m", "optim.lr=1e-3,3e-3", *args], tmp_path)
    assert p.returncode != 0 and "Starting with 2 processes" not in p.stderr + p.stdout
    assert "a multi-process run cannot be a job of a Hydra multirun" in p.stderr
    p = run(["pretrain", *args, "trainer.strategy=ddp_spawn"], tmp_path)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "llmstages pretrain: config (conf/ + command-line overrides): pretrain.trainer.strategy: 'ddp_spawn' starts "
        "its processes by spawn or fork, which is not supported; use trainer.strategy=ddp (Lightning reruns the "
        "command for each process)")
