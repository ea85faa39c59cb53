"""Shared fixtures: Hydra composition of the real conf/, and a tiny pipeline run in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Per-stage overrides that make each stage run in seconds on the tiny model: the tiny experiment preset
# (conf/experiment_stage/<stage>/tiny.yaml, as `llmstages <stage> experiment=tiny`) and a few test settings.
FAST = ["trainer.enable_progress_bar=false", "trainer.precision=32-true", "probes.max_new_tokens=32"]
TINY = {
    "data": ["experiment=tiny", "data.max_corpus_mb=0.3"],
    "pretrain": ["experiment=tiny", "trainer.max_steps=40", "trainer.val_check_interval=20", *FAST],
    "sft": ["experiment=tiny", *FAST],
    "reward": ["experiment=tiny", *FAST],
    "rlhf": ["experiment=tiny", "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=10",
             "trainer.limit_val_batches=2", *FAST],
}


def compose(stage: str, overrides: list[str] | None = None):
    """The config `llmstages <stage> [overrides]` would run with (real Hydra composition of conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmstages.cli import experiment_override

    with initialize_config_dir(str(CONF), version_base=None):
        return hydra_compose(config_name=f"entry/{stage}",
                             overrides=[experiment_override(stage, o) for o in overrides or []])


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


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): a LevelDB-style log (7-byte header, 32 KiB
    blocks, chunks with a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record``s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            records.append(rec)
    return records
