"""Data stage: corpus -> tokenizer (trained or brought) + token files, and the SFT, preference and RL-prompt sets."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.build import build_data
from .stage import Stage


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Build every data artifact into ``out_dir`` (atomically) and return its summary metrics."""
    src = OmegaConf.to_container(cfg.data, resolve=True)
    inputs = [p for p in (src["sft"]["path"], src["preference"]["path"], src["tokenizer"]["path"]) if p]
    stage = Stage("data", cfg, out_dir, inputs=inputs)
    metrics = build_data(out_dir, corpus=src["corpus"], corpus_format=src["corpus_format"],
                         text_column=src["text_column"], hf_split=src["hf_split"], max_corpus_mb=src["max_corpus_mb"],
                         max_doc_mb=src["max_doc_mb"], tokenizer=src["tokenizer"], vocab_size=cfg.vocab_size,
                         tokenizer_sample_mb=cfg.tokenizer_sample_mb, val_fraction=cfg.val_fraction, seed=cfg.seed,
                         arithmetic_max=cfg.arithmetic_max, heldout_fraction=cfg.heldout_fraction,
                         arithmetic_corpus_passes=cfg.arithmetic_corpus_passes, sft=src["sft"],
                         preference=src["preference"])
    return stage.finish(metrics)
