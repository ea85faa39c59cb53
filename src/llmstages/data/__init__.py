"""Data stage: corpus selection, tokenizer training, token files and verifiable task sets."""

from llmstages.data.build import build_data

__all__ = ["build_data"]
