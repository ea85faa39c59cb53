"""Shared fixtures: Hydra composition of the real conf/, and a tiny pipeline run in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Per-stage overrides that make each stage run in seconds on the tiny model (mirrors conf/experiment/tiny.yaml).
FAST = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=10",
        "trainer.precision=32-true"]
TINY = {
    "data": ["data.max_corpus_mb=0.3", "vocab_size=512", "arithmetic_max=5"],
    "pretrain": ["model=tiny", "batch_size=8", "seq_len=64", "trainer.max_steps=40", "trainer.val_check_interval=20",
                 "optim.lr=3e-3", "optim.warmup_steps=5", *FAST],
    "sft": ["batch_size=16", "max_len=64", "eval_limit=16", "eval_max_new_tokens=8", "trainer.max_steps=20",
            "trainer.val_check_interval=10", "optim.warmup_steps=2", *FAST],
    "reward": ["batch_size=16", "max_len=64", "trainer.max_steps=20", "trainer.val_check_interval=10",
               "optim.warmup_steps=2", *FAST],
    "rlhf": ["eval_limit=16", "eval_max_new_tokens=8", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4",
             "ppo.max_new_tokens=8", "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.minibatch_size=4",
             "grpo.max_new_tokens=8", "dpo.batch_size=8", "dpo.max_len=64", "dpo.prompts_per_step=4", "dpo.minibatch_size=2",
             "dpo.max_new_tokens=8", "trainer.max_steps=8",
             "optim.warmup_steps=1", *FAST],
}


def compose(stage: str, overrides: list[str] | None = None):
    """The config `llmstages <stage> [overrides]` would run with (real Hydra composition of conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base=None):
        return hydra_compose(config_name=f"entry/{stage}", overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Run data -> pretrain -> sft -> reward -> rlhf on the tiny model in a temp folder; return its path and metrics.

    Uses a real Lightning Trainer per stage and a real MLflow store (sqlite) under the temp folder.
    """
    from llmstages.cli import run_stage

    work = tmp_path_factory.mktemp("pipeline")
    old = os.getcwd()
    os.chdir(work)
    os.environ["LLMSTAGES_PIPELINE_RUN"] = "test-pipeline"
    try:
        metrics = {}
        for stage in ("data", "pretrain", "sft", "reward", "rlhf"):
            cfg = compose(stage, TINY[stage])
            metrics[stage] = run_stage(stage, cfg, f"outputs/{stage}", source="test")
    finally:
        os.environ.pop("LLMSTAGES_PIPELINE_RUN", None)
        os.chdir(old)
    return work, metrics
