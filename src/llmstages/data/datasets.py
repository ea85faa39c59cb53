"""Datasets and collators shared by the training stages.

Everything here reads the files the ``data`` stage wrote (token files and JSONL sets) and yields plain
tensors; nothing reads the config tree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..tokenizer import PAD_ID, encode_chat, encode_prompt
from .build import read_jsonl

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt", "answer")


class TokenWindows(Dataset):
    """Random fixed-length windows of a uint16 token file, for next-token prediction.

    Item ``i`` is ``(x, y)``, both ``(seq_len,)`` int64, with ``y`` = ``x`` shifted by one token. Window
    offsets are a deterministic function of ``(seed, i)``, so a resumed run sees the same data.

    Raises:
        ValueError: if the file holds fewer than ``seq_len + 1`` tokens.
    """

    def __init__(self, path: str | Path, seq_len: int, num_samples: int, seed: int = 0) -> None:
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.num_samples = seq_len, num_samples
        rng = np.random.default_rng(seed)
        self.offsets = rng.integers(0, len(self.tokens) - seq_len - 1, size=num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = int(self.offsets[i])
        chunk = torch.from_numpy(self.tokens[o: o + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def _pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


def encode_sft(tok, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]] | None:
    """Chat-template ids and loss mask for one example, at most ``max_len`` tokens, or ``None`` if impossible.

    Too-long examples keep the whole response (with its EOS) and the end of the prompt: the prompt is cut on
    the left, after ``<|bos|><|user|>``. A response longer than ``max_len - 3`` is cut on the right (its EOS
    lost). ``None`` when not even one response token fits (``max_len < 4``).
    """
    ids, mask = encode_chat(tok, prompt, response)
    if len(ids) <= max_len:
        return ids, mask
    n_prompt = mask.index(1)  # <|bos|><|user|> body <|assistant|>
    keep_resp = min(len(ids) - n_prompt, max_len - 3)
    if keep_resp < 1:
        return None
    body = ids[2:n_prompt - 1]
    body = body[len(body) - (max_len - keep_resp - 3):] if max_len - keep_resp > 3 else []
    ids = ids[:2] + body + [ids[n_prompt - 1]] + ids[n_prompt:n_prompt + keep_resp]
    return ids, [0] * (len(body) + 3) + [1] * keep_resp


class SFTDataset(Dataset):
    """Prompt/response pairs rendered with the chat template.

    Item: ``(input_ids, loss_mask)`` lists; the collator shifts them into ``(B, T)`` inputs, targets and a
    target mask that is 1 on response tokens and the final EOS only.
    """

    def __init__(self, rows: list[dict], tok, max_len: int) -> None:
        self.items = [e for r in rows if (e := encode_sft(tok, r["prompt"], r["response"], max_len))]
        if not self.items:
            raise ValueError("SFT set is empty after encoding (every row longer than max_len?)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_sft(batch) -> dict[str, torch.Tensor]:
    """``inputs``/``targets``/``loss_mask`` ``(B, T-1)``: targets are inputs shifted left, PAD after the end."""
    ids = _pad_right([b[0] for b in batch], PAD_ID)
    mask = _pad_right([b[1] for b in batch], 0)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask[:, 1:]}


class PreferenceDataset(Dataset):
    """Chosen/rejected pairs, each rendered as a full chat: item ``(chosen_ids, rejected_ids, chosen_loss_mask,
    rejected_loss_mask)``, the masks 1 on response tokens (and EOS)."""

    def __init__(self, rows: list[dict], tok, max_len: int) -> None:
        self.items = []
        for r in rows:
            c = encode_sft(tok, r["prompt"], r["chosen"], max_len)
            j = encode_sft(tok, r["prompt"], r["rejected"], max_len)
            if c and j:
                self.items.append((c[0], j[0], c[1], j[1]))
        if not self.items:
            raise ValueError("preference set is empty after encoding")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_pairs(batch) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded, all ``(2B, T)``: ``tokens``, ``mask`` (1 on real tokens) and
    ``loss_mask`` (1 on response tokens)."""
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    return {"tokens": _pad_right(seqs, PAD_ID), "mask": _pad_right([[1] * len(s) for s in seqs], 0),
            "loss_mask": _pad_right([b[2] for b in batch] + [b[3] for b in batch], 0)}


class PromptDataset(Dataset):
    """RL prompts: item ``{"prompt_ids": list[int], "answer": str, "task": str, "prompt": str}``."""

    def __init__(self, rows: list[dict], tok, max_prompt_len: int) -> None:
        self.items = []
        for r in rows:
            ids = encode_prompt(tok, r["prompt"])
            if len(ids) <= max_prompt_len:
                self.items.append({"prompt_ids": ids, "answer": r.get("answer", ""), "task": r.get("task", ""),
                                   "prompt": r["prompt"]})
        if not self.items:
            raise ValueError("prompt set is empty after encoding")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_prompts(batch) -> list[dict]:
    return list(batch)

