"""Loss masks and batches as the stages see them, checked position by position."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from llmstages.data.datasets import (PreferenceDataset, SFTDataset, TokenWindows, collate_padding_free, collate_pairs,
                                     collate_pairs_padding_free, collate_sft, first_fit_decreasing, fit_length, pack,
                                     packed_attention)
from llmstages.losses import next_token_loss
from llmstages.model import GPT, GPTConfig
from llmstages.tokenizer import ChatTokenizer, train_tokenizer
from llmstages.stages.sft import SFTModule

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = range(6)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What's 2 + 2? 4. Hello world, a tiny corpus."] * 20, vocab_size=300)


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def test_sft_batch_supervises_response_and_eos_only(tok):
    ds = SFTDataset([chat("What's 2 + 2?", "4"), chat("Hello", "world 12")], tok, max_len=64)
    batch = collate_sft([ds[0], ds[1]], pad_id=PAD)
    ids0, mask0 = ds[0]
    prompt_ids = [BOS, USER, *tok.encode("What's 2 + 2?"), ASSISTANT]
    assert ids0 == prompt_ids + tok.encode("4") + [EOS]
    assert mask0 == [0] * len(prompt_ids) + [1, 1]
    # Shifted by one: targets[t] = ids[t + 1]; mask on the response token "4" and the final EOS only.
    T = batch["inputs"].shape[1]
    assert batch["targets"][0, : len(ids0) - 1].tolist() == ids0[1:]
    assert batch["loss_mask"][0].tolist() == [0] * (len(prompt_ids) - 1) + [1, 1] + [0] * (T - len(ids0) + 1)
    # Right padding of the shorter row is PAD and never supervised.
    pad = batch["targets"][0, len(ids0) - 1:]
    assert (pad == PAD).all() and batch["loss_mask"][0, len(ids0) - 1:].sum() == 0
    assert ds.stats.summary() == {"rows_read": 2, "rows_kept": 2, "rows_truncated": 0,
                                  "tokens": len(ds[0][0]) + len(ds[1][0])}


def test_multi_turn_loss_on_assistant_turns_only(tok):
    ds = SFTDataset([chat("Hello", "world", "2 + 2?", "4")], tok, max_len=64)
    ids, mask = ds[0]
    h, w, q, a = (tok.encode(t) for t in ("Hello", "world", "2 + 2?", "4"))
    assert ids == [BOS, USER, *h, ASSISTANT, *w, EOS, USER, *q, ASSISTANT, *a, EOS]
    assert mask == [0, 0, *[0] * len(h), 0, *[1] * len(w), 1, 0, *[0] * len(q), 0, *[1] * len(a), 1]


def test_pad_equal_to_eos_masks_only_padding(tok):
    """A tokenizer whose PAD is its EOS (as GPT-2's): each example still ends with exactly one supervised EOS."""
    same = ChatTokenizer(tok.tok, bos="<|bos|>", eos="<|eos|>", pad="<|eos|>")
    assert same.pad_id == same.eos_id == EOS
    ds = SFTDataset([chat("What's 2 + 2?", "4"), chat("Hello there, world", "world 12 and more")], same, max_len=64)
    batch = collate_sft([ds[0], ds[1]], pad_id=same.pad_id)
    for row, (ids, _) in enumerate((ds[0], ds[1])):
        n = len(ids) - 1  # targets of this row
        targets, mask = batch["targets"][row], batch["loss_mask"][row]
        supervised_eos = [(t, m) for t, m in zip(targets[:n].tolist(), mask[:n].tolist()) if t == EOS]
        assert supervised_eos == [(EOS, 1)]  # exactly one EOS in the example, and it is supervised
        assert (targets[n:] == EOS).all() and mask[n:].sum() == 0  # padding (also EOS ids) masked


def test_masked_loss_equals_hand_average_over_response(tok):
    ds = SFTDataset([chat("Hello", "world")], tok, max_len=64)
    batch = collate_sft([ds[0]], pad_id=PAD)
    torch.manual_seed(0)
    logits = torch.randn(*batch["targets"].shape, 300)
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[0, t, batch["targets"][0, t]].item() for t in range(batch["targets"].shape[1])
              if batch["loss_mask"][0, t]]
    assert next_token_loss(logits, batch["targets"], batch["loss_mask"]).item() == pytest.approx(np.mean(picked), rel=1e-6)
    with pytest.raises(ValueError, match="no supervised token"):  # never a fake 0.0 loss
        next_token_loss(logits, batch["targets"], torch.zeros_like(batch["loss_mask"]))


def test_fit_length_policies():
    ctx, resp = [BOS, USER, 10, 11, 12, 13, ASSISTANT], [20, 21, EOS]
    assert fit_length(ctx, [0] * 7, [resp], 10, "truncate_left") == (ctx, [0] * 7, [resp], False)
    # 8 tokens: keep <bos><user>, the end of the prompt and the whole response
    assert fit_length(ctx, [0] * 7, [resp], 8, "truncate_left") == ([BOS, USER, 12, 13, ASSISTANT], [0] * 5, [resp],
                                                                     True)
    assert fit_length(ctx, [0] * 7, [resp], 8, "drop") is None
    # both too long for their half: the prompt keeps max_len // 2 tokens, the response is cut on the right
    long_resp = [20 + i for i in range(12)] + [EOS]
    assert fit_length(ctx, [0] * 7, [long_resp], 8, "truncate_left") == ([BOS, USER, 13, ASSISTANT], [0] * 4,
                                                                         [long_resp[:4]], True)
    # a short prompt is kept whole; the long response takes the rest
    assert fit_length(ctx[:3] + [ASSISTANT], [0] * 4, [long_resp], 10, "truncate_left") == (
        ctx[:3] + [ASSISTANT], [0] * 4, [long_resp[:6]], True)
    # the smallest fit: <bos><user><|assistant|> and one response token
    assert fit_length(ctx, [0] * 7, [resp], 4, "truncate_left") == ([BOS, USER, ASSISTANT], [0] * 3, [[20]], True)
    assert fit_length(ctx, [0] * 7, [resp], 3, "truncate_left") is None
    # two responses (a preference pair) share one prompt cut, set by the longer response
    out = fit_length(ctx, [0] * 7, [resp, [30, EOS]], 8, "truncate_left")
    assert out == ([BOS, USER, 12, 13, ASSISTANT], [0] * 5, [resp, [30, EOS]], True)


def test_long_prompt_policy_counts(tok):
    rows = [chat("Hello world " * 40, "4"), chat("Hi", "4"), chat("Hello", "world " * 30)]
    cut = SFTDataset(rows, tok, max_len=16)
    assert cut.stats.summary() == {"rows_read": 3, "rows_kept": 3, "rows_truncated": 2,
                                   "tokens": sum(len(i[0]) for i in cut.items)}
    ids, mask = cut[0]
    assert len(ids) == 16 and ids[:2] == [BOS, USER] and ids[-3:] == [ASSISTANT, *tok.encode("4"), EOS][-3:]
    assert sum(mask) == 2 and mask[-2:] == [1, 1]
    ids, mask = cut[2]  # response cut on the right: its EOS is lost, every kept response token supervised
    assert ids[:5] == tok.encode_prompt("Hello") and len(ids) == 16 and EOS not in ids and sum(mask) == 11
    dropped = SFTDataset(rows, tok, max_len=16, long_prompt="drop")
    assert dropped.stats.summary() == {"rows_read": 3, "rows_kept": 1, "rows_truncated": 0, "rows_dropped_too_long": 2,
                                       "tokens": len(dropped[0][0])}
    with pytest.raises(ValueError, match=r"SFT set \(max_len=16, long_prompt=drop\): all 2 rows were dropped "
                                         r"\(too_long: 2\)"):
        SFTDataset([rows[0], rows[2]], tok, max_len=16, long_prompt="drop")
    with pytest.raises(ValueError, match="long_prompt='left'"):
        SFTDataset(rows, tok, max_len=16, long_prompt="left")


def test_packing_keeps_examples_apart(tok):
    """Packed examples give exactly the per-example losses of unpacked ones (own positions, no cross attention)."""
    rows = [chat("What's 2 + 2?", "4"), chat("Hello", "world 12"), chat("Hi", "a tiny corpus"), chat("2", "2 + 2")]
    plain = SFTDataset(rows, tok, max_len=24)
    packed = SFTDataset(rows, tok, max_len=24, packing=True)
    lengths = [len(i[0]) for i in plain.items]
    assert lengths == [13, 11, 9, 9]
    assert [len(p[0]) for p in packed.items] == [lengths[0] + lengths[1], lengths[2] + lengths[3]]
    ids, mask, seg = packed[0]
    assert ids == plain[0][0] + plain[1][0] and mask == plain[0][1] + plain[1][1]
    assert seg == [1] * lengths[0] + [2] * lengths[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()
    b = collate_sft(packed.items, pad_id=PAD)
    logits = model(b["inputs"], positions=b["positions"], attn_mask=b["attn_mask"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
    packed_sum = (ce * b["loss_mask"].flatten()).sum()
    single = [collate_sft([x], pad_id=PAD) for x in plain.items]
    plain_sum = sum(next_token_loss(model(s["inputs"]), s["targets"], s["loss_mask"]) * s["loss_mask"].sum()
                    for s in single)
    assert packed_sum.item() == pytest.approx(plain_sum.item(), rel=1e-5)
    assert b["loss_mask"].sum() == sum(s["loss_mask"].sum() for s in single)


def test_padding_free_batch_gives_the_padded_batch_loss(tok):
    """A padding-free batch holds the same examples as the padded one (first-fit decreasing: 13 + 9 + ... into
    rows of 24) and gives the same loss and gradient."""
    rows = [chat("What's 2 + 2?", "4"), chat("Hello", "world 12"), chat("Hi", "a tiny corpus"), chat("2", "2 + 2")]
    items = SFTDataset(rows, tok, max_len=24).items  # lengths 13, 11, 9, 9
    free = collate_padding_free(items, pad_id=PAD, max_len=24)
    padded = collate_sft(items, pad_id=PAD)
    # decreasing: 13 -> row 1; 11 -> row 1 (24); 9 -> row 2; 9 -> row 2 (18): 2 rows of 23, not 4 of 12
    assert free["inputs"].shape == (2, 23) and padded["inputs"].shape == (4, 12)
    assert free["loss_mask"].sum() == padded["loss_mask"].sum()
    assert free["positions"][0].tolist() == list(range(13)) + list(range(10))  # inputs drop the last token
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    grads = []
    for b in (padded, free):
        model.zero_grad()
        logits = model(b["inputs"], positions=b.get("positions"), attn_mask=b.get("attn_mask"))
        loss = next_token_loss(logits, b["targets"], b["loss_mask"])
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    assert torch.allclose(grads[1][1], grads[0][1], atol=1e-6)


def test_first_fit_decreasing_hand_checked():
    # capacity 8, longest first: 7 -> row 0 (1 left); 5 -> row 1 (3 left); 4 -> row 2 (4 left); 3 -> row 1; 2 -> row 2
    assert first_fit_decreasing([5, 3, 7, 2, 4], 8) == [[2], [0, 1], [4, 3]]


def test_padding_free_pairs_give_the_padded_rewards(tok):
    """Reward-model scores of packed pairs equal those of the padded batch, pair by pair, chosen then rejected."""
    from llmstages.stages.reward import RewardModule

    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}
            for q, c, r in [("What's 2 + 2?", "4", "5 5 5"), ("Hello", "world", "a tiny corpus, hello world"),
                            ("Hi", "Hello world.", "12")]]
    items = PreferenceDataset(rows, tok, max_len=64).items
    free, padded = collate_pairs_padding_free(items, pad_id=PAD, max_len=40), collate_pairs(items, pad_id=PAD)
    assert free["tokens"].shape[0] < padded["tokens"].shape[0] == 6 and free["last"].shape == (6, 2)
    lengths = padded["mask"].sum(1).tolist()
    assert [int(free["positions"][r, c]) for r, c in free["last"].tolist()] == [n - 1 for n in lengths]
    torch.manual_seed(0)
    module = RewardModule(GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)), {})
    torch.nn.init.normal_(module.head.linear.weight)
    assert torch.allclose(module.scores(free), module.scores(padded), atol=1e-5)


def test_packed_attention_hand_checked():
    attn, pos = packed_attention(torch.tensor([[1, 1, 2, 2, 2, 0]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert attn[0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                      [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert pack([([1, 2], [0, 1]), ([3], [1]), ([4, 5, 6], [0, 0, 1])], 3) == [([1, 2, 3], [0, 1, 1], [1, 1, 2]),
                                                                                ([4, 5, 6], [0, 0, 1], [1, 1, 1])]


def test_preference_batch_chosen_then_rejected(tok):
    row = {"prompt": [{"role": "user", "content": "What's 2 + 2?"}], "chosen": "4", "rejected": "5 5 5"}
    ds = PreferenceDataset([row], tok, max_len=64)
    b = collate_pairs([ds[0]], pad_id=PAD)
    assert b["tokens"].shape[0] == 2
    lengths = b["mask"].sum(1).tolist()
    assert lengths == [len(ds[0][0]), len(ds[0][1])]
    assert b["tokens"][0, lengths[0] - 1] == EOS and b["tokens"][1, lengths[1] - 1] == EOS
    # DPO's loss mask: the response tokens (and EOS) of each row, nothing of the prompt or padding
    assert b["loss_mask"][0, :lengths[0]].tolist() == ds[0][2] and b["loss_mask"][1, :lengths[1]].tolist() == ds[0][3]
    assert b["loss_mask"][0, lengths[0]:].sum() == 0 and b["loss_mask"][0].sum() == 2  # "4" + EOS
    long = {**row, "prompt": [{"role": "user", "content": "Hello world " * 40}]}
    cut = PreferenceDataset([long, row], tok, max_len=20)
    c, j = cut[0][0], cut[0][1]
    assert len(j) == 20 and c[:-2] == j[:-len(tok.encode("5 5 5")) - 1]  # the same prompt cut on both sides
    assert cut.stats.truncated == 1 and cut.stats.kept == 2
    with pytest.raises(ValueError, match=r"preference set \(max_len=20, long_prompt=drop\): all 1 rows were dropped"):
        PreferenceDataset([long], tok, max_len=20, long_prompt="drop")


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
    (np.arange(1000, dtype=np.uint32) + 70000).astype("<u4").tofile(tmp_path / "big.bin")
    x, y = TokenWindows(tmp_path / "big.bin", seq_len=8, num_samples=2, dtype="uint32")[0]
    assert int(x.min()) >= 70000 and torch.equal(y, x + 1)


def test_collate_partial_pickles():
    import pickle

    assert pickle.loads(pickle.dumps(partial(collate_sft, pad_id=0)))([([1, 2], [0, 1])])["inputs"].tolist() == [[1]]


def test_sft_loss_runs_the_lm_head_at_supervised_positions_only_with_the_same_loss_and_gradient(tok):
    """SFTModule computes logits only where the loss mask is set: same loss and gradient as the masked mean of
    the cross-entropy over every position's logits."""
    rows = [chat("What's 2 + 2?", "4"), chat("Hello", "world 12"), chat("Hi", "a tiny corpus")]
    b = collate_padding_free(SFTDataset(rows, tok, max_len=24).items, pad_id=PAD, max_len=24)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    results = []
    for loss_fn in (lambda: next_token_loss(model(b["inputs"], positions=b["positions"], attn_mask=b["attn_mask"]),
                                            b["targets"], b["loss_mask"]),
                    lambda: SFTModule(model, {}).token_losses(b).mean()):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert torch.allclose(results[1][1], results[0][1], atol=1e-7)
    with pytest.raises(ValueError, match="no supervised token"):
        SFTModule(model, {}).token_losses({**b, "loss_mask": torch.zeros_like(b["loss_mask"])})
