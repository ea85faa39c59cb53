"""Loss masks and batches as the stages see them, checked position by position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmstages.data.datasets import (PreferenceDataset, SFTDataset, TokenWindows, collate_pairs, collate_sft,
                                     encode_sft)
from llmstages.losses import next_token_loss
from llmstages.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, USER_ID, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What's 2 + 2? 4. Hello world, a tiny corpus."] * 20, vocab_size=300)


def test_sft_batch_supervises_response_and_eos_only(tok):
    rows = [{"prompt": "What's 2 + 2?", "response": "4"}, {"prompt": "Hello", "response": "world 12"}]
    ds = SFTDataset(rows, tok, max_len=64)
    batch = collate_sft([ds[0], ds[1]])
    ids0, mask0 = ds[0]
    prompt_ids = [BOS_ID, USER_ID, *tok.encode("What's 2 + 2?", add_special_tokens=False).ids, ASSISTANT_ID]
    assert ids0 == prompt_ids + tok.encode("4", add_special_tokens=False).ids + [EOS_ID]
    assert mask0 == [0] * len(prompt_ids) + [1, 1]
    # Shifted by one: targets[t] = ids[t + 1]; mask on the response token "4" and the final EOS only.
    T = batch["inputs"].shape[1]
    assert batch["targets"][0, : len(ids0) - 1].tolist() == ids0[1:]
    assert batch["loss_mask"][0].tolist() == [0] * (len(prompt_ids) - 1) + [1, 1] + [0] * (T - len(ids0) + 1)
    # Right padding of the shorter row is PAD and never supervised.
    pad = batch["targets"][0, len(ids0) - 1:]
    assert (pad == PAD_ID).all() and batch["loss_mask"][0, len(ids0) - 1:].sum() == 0


def test_masked_loss_equals_hand_average_over_response(tok):
    ds = SFTDataset([{"prompt": "Hello", "response": "world"}], tok, max_len=64)
    batch = collate_sft([ds[0]])
    torch.manual_seed(0)
    logits = torch.randn(*batch["targets"].shape, 300)
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[0, t, batch["targets"][0, t]].item() for t in range(batch["targets"].shape[1])
              if batch["loss_mask"][0, t]]
    assert next_token_loss(logits, batch["targets"], batch["loss_mask"]).item() == pytest.approx(np.mean(picked), rel=1e-6)


def test_too_long_prompt_is_cut_on_the_left_keeping_response(tok):
    ids, mask = encode_sft(tok, "Hello world " * 40, "4", max_len=16)
    assert len(ids) == len(mask) == 16
    assert ids[:2] == [BOS_ID, USER_ID] and ids[-1] == EOS_ID and ASSISTANT_ID in ids
    assert mask[-2:] == [1, 1] and sum(mask) == 2
    assert encode_sft(tok, "Hello", "4", max_len=3) is None
    ids, mask = encode_sft(tok, "Hello", "world " * 30, max_len=8)  # response cut on the right
    assert len(ids) == 8 and ids[:2] == [BOS_ID, USER_ID] and ids[2] == ASSISTANT_ID and mask == [0, 0, 0] + [1] * 5


def test_preference_batch_chosen_then_rejected(tok):
    ds = PreferenceDataset([{"prompt": "What's 2 + 2?", "chosen": "4", "rejected": "5 5 5"}], tok, max_len=64)
    b = collate_pairs([ds[0]])
    assert b["tokens"].shape[0] == 2
    lengths = b["mask"].sum(1).tolist()
    assert lengths == [len(ds[0][0]), len(ds[0][1])]
    assert b["tokens"][0, lengths[0] - 1] == EOS_ID and b["tokens"][1, lengths[1] - 1] == EOS_ID
    # DPO's loss mask: the response tokens (and EOS) of each row, nothing of the prompt or padding
    assert b["loss_mask"][0, :lengths[0]].tolist() == ds[0][2] and b["loss_mask"][1, :lengths[1]].tolist() == ds[0][3]
    assert b["loss_mask"][0, lengths[0]:].sum() == 0 and b["loss_mask"][0].sum() == 2  # "4" + EOS


def test_token_windows_are_shifted_and_deterministic(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    data.tofile(tmp_path / "t.bin")
    a = TokenWindows(tmp_path / "t.bin", seq_len=16, num_samples=5, seed=3)
    b = TokenWindows(tmp_path / "t.bin", seq_len=16, num_samples=5, seed=3)
    x, y = a[2]
    assert x.shape == (16,) and torch.equal(y, x + 1)
    assert torch.equal(x, b[2][0])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenWindows(tmp_path / "t.bin", seq_len=5000, num_samples=1)
