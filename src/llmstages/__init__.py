"""llmstages: pretraining, SFT and RLHF of a causal LM as one DVC + Hydra + Lightning pipeline."""

__version__ = "0.1.0"

STAGES = ("data", "pretrain", "sft", "reward", "rlhf")  # the pipeline's stages, in order
HF_INSTALL = "pip install -e '.[hf]' in the llmstages folder"  # how to add the hf extra (transformers, peft)
