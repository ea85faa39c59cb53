"""Data stage: corpus -> BPE tokenizer + uint16 token files, and the SFT, preference and RL-prompt sets."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..data.build import build_data
from .common import Stage


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Build every data artifact into ``out_dir`` (atomically) and return its summary metrics."""
    src = cfg.data
    inputs = [p for p in (src.sft_path, src.preference_path) if p]
    stage = Stage("data", cfg, out_dir, inputs=inputs)
    metrics = build_data(out_dir, corpus=list(src.corpus), max_corpus_mb=src.max_corpus_mb, vocab_size=cfg.vocab_size,
                         val_fraction=cfg.val_fraction, seed=cfg.seed, arithmetic_max=cfg.arithmetic_max,
                         heldout_fraction=cfg.heldout_fraction, sft_path=src.sft_path,
                         preference_path=src.preference_path)
    return stage.finish(metrics)
