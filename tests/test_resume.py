"""Exact resume: a stage killed with `kill -9` and started again with the same command continues from its last
checkpoint and trains on the batches the uninterrupted run would: the same loss at every step, the same final
metrics, and one point per step in each tracker: MLflow, CSV, W&B offline and the DVC curves."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from conftest import ROOT, TINY, compose, wandb_records

LLMSTAGES = str(Path(sys.executable).parent / "llmstages")


def losses(out: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of a stage output's DVC curve (full float precision)."""
    with open(out / "curves" / f"{key}.tsv", newline="") as fh:
        return {int(r["step"]): float(r[key.rsplit("/", 1)[1]]) for r in csv.DictReader(fh, delimiter="\t")}


def logged_past(ckpts: Path, step: int) -> bool:
    """Whether the running stage has logged its training loss beyond ``step`` (its curve beside the checkpoint)."""
    for f in ckpts.glob("*/curves/plots/metrics/train/*_loss.tsv"):
        with open(f, newline="") as fh:
            if any(int(r["step"]) > step for r in csv.DictReader(fh, delimiter="\t")):
                return True
    return False


def kill_after_first_checkpoint(args: list[str], cwd: Path, env: dict, every: int) -> None:
    """Start ``llmstages <args>``, SIGKILL its process group once its first checkpoint (step ``every``) is written
    and a step after it has been logged, so that the trackers hold steps that the resumed run repeats. (Not in
    the milliseconds between the checkpoint's write and its own step's log line: a kill there loses that one
    point, see the README on resuming.)"""
    proc = subprocess.Popen([LLMSTAGES, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts, deadline = cwd / "outputs/checkpoints", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (list(ckpts.glob("*/last.ckpt"))
                                                                   and logged_past(ckpts, every - 1)):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("*/last.ckpt")), "no checkpoint was written before the kill"


KILL_HOOK = '''
"""Test hook (PYTHONPATH): SIGKILL this process group at its optimizer step number LLMSTAGES_TEST_KILL_AT_STEP,
after that step's forward and backward (in PPO, GRPO and online DPO: after the iteration's rollout) and before the
parameters change; LLMSTAGES_TEST_KILL_WAIT seconds later (W&B writes its file once a second)."""
import os
import signal
import time

import torch

_at, _calls = int(os.environ["LLMSTAGES_TEST_KILL_AT_STEP"]), [0]
_step = torch.optim.AdamW.step


def step(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == _at:
        time.sleep(float(os.environ.get("LLMSTAGES_TEST_KILL_WAIT", "0")))
        os.killpg(0, signal.SIGKILL)
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = step
'''


def run_killed_at_step(args: list[str], cwd: Path, env: dict, at: int, wait: float = 0.0) -> None:
    """Run ``llmstages <args>`` in its own process group with :data:`KILL_HOOK`: SIGKILLed (the process and its
    helpers, as ``kill -9`` of a job does) at its optimizer step ``at``, ``wait`` seconds into that step."""
    hook = cwd / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    killed = subprocess.run([LLMSTAGES, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                            start_new_session=True,
                            env={**env, "LLMSTAGES_TEST_KILL_AT_STEP": str(at), "LLMSTAGES_TEST_KILL_WAIT": str(wait),
                                 "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list((cwd / "outputs/checkpoints").glob("*/last.ckpt")), "no checkpoint was written before the kill"


def resume_and_run_straight(args: list[str], resumed_args: list[str], cwd: Path, env: dict) -> tuple[dict, dict]:
    """Rerun the killed command (it must say it resumes), run the same stage uninterrupted into
    ``outputs/straight``; return both runs' ``metrics.json``."""
    p = subprocess.run([LLMSTAGES, *resumed_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout + p.stderr
    p = subprocess.run([LLMSTAGES, *args, "out_dir=outputs/straight", "logger=none"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return tuple(json.loads((cwd / f"outputs/{d}/metrics.json").read_text()) for d in ("resumed", "straight"))


def rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.parametrize("stage, boundary", [("sft", False), ("sft", True), ("reward", False), ("pretrain", False)])
def test_killed_stage_resumes_exactly(tiny_run, tmp_path, stage, boundary):
    """Killed after its first checkpoint (mid-pass, or with ``boundary`` at the last step inside the first pass
    over the data, so that the resumed run's first batch straddles two passes) and rerun: per-step training
    losses and final metrics equal the uninterrupted run's, and MLflow holds each step once."""
    import mlflow

    work, _ = tiny_run
    inputs = {"pretrain": [], "sft": [f"init_from={work}/outputs/pretrain"],
              "reward": [f"init_from={work}/outputs/sft"]}[stage]
    n_train = {"pretrain": 0, "sft": rows(work / "outputs/data/sft_train.jsonl"),
               "reward": rows(work / "outputs/data/pref_train.jsonl")}[stage]
    key = "train/bt_loss" if stage == "reward" else "train/lm_loss"
    batch = 64
    per_epoch = n_train // batch  # whole batches in the first pass over the data
    every = per_epoch if boundary else 7
    steps = max(3 * every, 30) if stage != "pretrain" else 60
    args = [stage, f"data_dir={work}/outputs/data", *inputs, *TINY[stage], f"batch_size={batch}",
            f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={every}", "trainer.log_every_n_steps=1",
            f"trainer.val_check_interval={steps // 2}"]
    if boundary:
        assert per_epoch < steps  # the run goes on into the second epoch
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(LLMSTAGES_CONF=str(ROOT / "conf"), LLMSTAGES_PIPELINE_RUN="resume-test")
    backends = "[mlflow,csv,wandb]" if stage == "pretrain" else "[mlflow,csv]"
    resumed_args = [*args, "out_dir=outputs/resumed", "logger=mlflow", f"logger.backends={backends}"]
    if stage == "pretrain":  # a kill by the step hook, once W&B has written its file
        run_killed_at_step(resumed_args, tmp_path, env, at=every + 3, wait=2.5)
    else:
        kill_after_first_checkpoint(resumed_args, tmp_path, env, every)
    assert not (tmp_path / "outputs/resumed/metrics.json").exists(), "the run ended before the kill"
    resumed, straight = resume_and_run_straight(args, resumed_args, tmp_path, env)
    assert resumed["resumed_from_step"] == every and straight["resumed_from_step"] == 0
    assert losses(tmp_path / "outputs/resumed", key) == losses(tmp_path / "outputs/straight", key)  # bit for bit
    assert len(losses(tmp_path / "outputs/straight", key)) == steps
    skip = {"wall_seconds", "resumed_from_step"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in straight.items() if k not in skip}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.stage = '{stage}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
    assert sorted(logged) == list(range(steps))  # one point per step across the kill
    (table,) = (tmp_path / "outputs/csv" / stage).glob("*/metrics.csv")  # the resumed run appended to it
    with open(table, newline="") as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r.get(key)]
    assert logged == list(range(steps))
    if stage == "pretrain":  # W&B: the killed run's offline records and the resumed run's, each step once
        logged = [int(float(row["trainer/global_step"])) for row in wandb_history(tmp_path / "outputs/wandb")
                  if key in row]
        assert sorted(logged) == list(range(steps))


def wandb_history(folder: Path) -> list[dict[str, str]]:
    """The history rows (``{key: JSON value}``) of every offline W&B run under ``folder``."""
    return [{i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            for path in sorted(folder.glob("offline-run-*/run-*.wandb")) for rec in wandb_records(path)
            if rec.WhichOneof("record_type") == "history"]


def curves(out: Path) -> dict[str, dict[int, float]]:
    """Every DVC curve of a stage output but the wall-clock ones: ``{key: {step: value}}``."""
    found = {}
    for f in sorted((out / "curves").rglob("*.tsv")):
        key = str(f.relative_to(out / "curves").with_suffix(""))
        if not key.startswith("time/"):
            with open(f, newline="") as fh:
                found[key] = {int(r.pop("step")): float(next(iter(r.values())))
                              for r in csv.DictReader(fh, delimiter="\t")}
    return found


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo-online", "dpo-offline"])
def test_killed_rlhf_resumes_exactly(tiny_run, tmp_path, algorithm):
    """An rlhf run killed (SIGKILL) at its 5th optimizer step, after the checkpoint of step 4: for PPO, GRPO and
    online DPO right after an iteration's rollout and before its first update. Rerun with the same command, it
    logs the same values at every step as the uninterrupted run (the rollouts' samples, minibatch order, prompt
    order and adaptive KL all continue where they were) and ends with the same metrics; MLflow holds each
    logged step once."""
    import mlflow

    work, _ = tiny_run
    algo, _, pairs = algorithm.partition("-")
    args = ["rlhf", f"data_dir={work}/outputs/data", f"policy_from={work}/outputs/sft",
            f"reward_from={work}/outputs/reward", *[a for a in TINY["rlhf"] if "every_n_steps" not in a],
            f"algorithm={algo}", *([f"dpo.pairs={pairs}"] if pairs else []), "trainer.max_steps=12",
            "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1"]
    if algo == "ppo":
        args.append("ppo.kl_target=1.0")  # the adaptive KL coefficient, a checkpointed buffer, changes each iteration
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(LLMSTAGES_CONF=str(ROOT / "conf"), LLMSTAGES_PIPELINE_RUN="resume-test")
    resumed_args = [*args, "out_dir=outputs/resumed", "logger=mlflow"]
    run_killed_at_step(resumed_args, tmp_path, env, at=5)
    resumed, straight = resume_and_run_straight(args, resumed_args, tmp_path, env)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == straight["steps"] == 12
    got, want = curves(tmp_path / "outputs/resumed"), curves(tmp_path / "outputs/straight")
    assert "train/reward" in want or "train/dpo_loss" in want
    assert got == want  # every logged quantity at every step, bit for bit
    if algo == "ppo":
        assert len(set(want["train/kl_coef"].values())) > 1
    skip = {"wall_seconds", "resumed_from_step"}
    same = {k: v for k, v in resumed.items() if k not in skip and not k.startswith("time_")}
    assert same == {k: v for k, v in straight.items() if k not in skip and not k.startswith("time_")}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'rlhf'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    key = "train/reward" if "train/reward" in want else "train/dpo_loss"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
    assert sorted(logged) == sorted(want[key])  # one point per step across the kill


UNTIMED = {"wall_seconds", "resumed_from_step"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "rlhf"])
def test_two_runs_of_a_stage_give_identical_metrics(tiny_run, tmp_path, monkeypatch, stage):
    """Determinism: a stage run again with the same seed, config and inputs (here with
    ``trainer.deterministic=true``, Lightning's switch to deterministic kernels) ends with the same metrics, bit for
    bit, as the tiny pipeline's run, and the same weights."""
    from safetensors.torch import load_file

    from llmstages.cli import run_stage

    work, metrics = tiny_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("LLMSTAGES_PIPELINE_RUN", "test-pipeline")
    cfg = compose(stage, [*TINY[stage], "trainer.deterministic=true", "logger=none"])
    again = run_stage(stage, cfg, str(tmp_path / stage), source="test")
    untimed = lambda m: {k: v for k, v in m.items() if k not in UNTIMED and not k.startswith("time_")}  # noqa: E731
    assert untimed(again) == untimed(metrics[stage])
    first, second = (load_file(d / "model.safetensors") for d in (work / "outputs" / stage, tmp_path / stage))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
