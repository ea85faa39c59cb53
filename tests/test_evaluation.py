"""Held-out evaluation pinned to hand-computed values: exact match per task, Wilson intervals, preference
accuracy, task-balanced win rate; and SFT raising exact match on a toy arithmetic set (real Lightning Trainer)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from llmstages.data.datasets import (ShuffledPasses, SFTDataset, collate_pairs, collate_sft, heldout_loader,
                                     task_weights)
from llmstages.data.tasks import arithmetic_qa
from llmstages.evaluation import (answer_metrics, eval_subset, generate_answers, heldout_pairs, pair_logprobs,
                                  preference_accuracy, task_balanced, wilson_interval, win_rate)
from llmstages.losses import sequence_logprobs
from llmstages.generation import Generation
from llmstages.model import GPT, GPTConfig
from llmstages.stages.sft import SFTModule
from llmstages.tokenizer import train_tokenizer


def test_wilson_interval_hand_computed():
    # 8 of 10: p = 0.8, z = 1.96: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674, half-width 0.22658
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # 0 of 10: the interval still has width (the normal approximation would give [0, 0])
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # 600 of 600 questions: the lower bound is what "at least 0.99" can claim
    assert wilson_interval(600, 600)[0] == pytest.approx(0.99364, abs=1e-5)
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(*bad)


def _gens(lengths: list[int], finished: list[bool]) -> list[Generation]:
    n = max(lengths)
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in lengths])
    return [Generation(tokens=torch.zeros(len(lengths), n + 1, dtype=torch.long), prompt_len=1,
                       attention_mask=torch.cat([torch.ones(len(lengths), 1, dtype=torch.long), mask], 1),
                       response_mask=mask, finished=torch.tensor(finished))]


def test_answer_metrics_per_task_with_intervals():
    rows = [{"answer": "4", "task": "arithmetic"}, {"answer": "12", "task": "arithmetic"},
            {"answer": "7", "task": "arithmetic"}, {"answer": "Return x.", "task": "docstring"}]
    responses = [" 4 ", "21", "7", "Return  x."]  # whitespace is normalised; "21" is wrong
    m = answer_metrics(rows, responses, _gens([2, 3, 2, 4], [True, True, False, True]))
    assert m["exact_match"] == 0.75 and m["exact_match_arithmetic"] == pytest.approx(2 / 3)
    assert m["exact_match_docstring"] == 1.0 and m["questions_arithmetic"] == 3 and m["questions_docstring"] == 1
    assert (m["exact_match_arithmetic_ci95_low"], m["exact_match_arithmetic_ci95_high"]) == \
        pytest.approx(wilson_interval(2, 3))
    assert m["mean_response_tokens"] == 2.75 and m["eos_fraction"] == 0.75


def test_eval_subset_limits_each_task_and_keeps_file_order():
    rows = [{"task": "arithmetic", "i": i} for i in range(10)] + [{"task": "explain", "i": i} for i in range(3)]
    sub = eval_subset(rows, 4)
    assert [r["task"] for r in sub].count("arithmetic") == 4 and [r for r in sub if r["task"] == "explain"] == rows[10:]
    assert sub == sorted(sub, key=rows.index) and eval_subset(rows, 4) == sub  # seeded
    assert eval_subset(rows, 0) == rows


def test_preference_accuracy_hand_computed():
    # All weights zero: every next-token distribution is uniform over V = 16 ids, so a response of k tokens
    # (EOS included) has log-probability -k log 16: the shorter response is the more likely one.
    model = GPT(GPTConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=16))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    prompt = [1, 3, 5]

    def pair(chosen: list[int], rejected: list[int]):
        return (prompt + chosen, prompt + rejected, [0] * 3 + [1] * len(chosen), [0] * 3 + [1] * len(rejected))

    items = [pair([7, 2], [8, 9, 2]),  # chosen shorter: right
             pair([7, 8, 9, 2], [7, 2]),  # chosen longer: wrong
             pair([7, 2], [9, 2])]  # same length, same log-probability: not strictly higher, wrong
    batches = DataLoader(items, batch_size=2, collate_fn=lambda b: collate_pairs(b, pad_id=0))
    m = preference_accuracy(model, batches, ["arithmetic", "arithmetic", "explain"])
    assert m["preference_accuracy"] == pytest.approx(1 / 3)
    assert (m["preference_accuracy_ci95_low"], m["preference_accuracy_ci95_high"]) == pytest.approx(wilson_interval(1, 3))
    assert m["preference_accuracy_arithmetic"] == 0.5 and m["preference_accuracy_explain"] == 0.0
    assert model.training  # the model's mode is restored


def test_pair_logprobs_equal_full_logits_sums_and_gradients():
    # The head at the response positions only gives the sums (and gradients) of every position's logits
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=32))
    items = [([1, 4, 5, 9, 2], [1, 4, 5, 7, 8, 3, 2], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]),
             ([1, 6, 11, 12, 13, 2], [1, 6, 11, 2], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1])]
    batch = collate_pairs(items, pad_id=0)
    chosen, rejected = pair_logprobs(model, batch)
    (chosen.sum() - 2 * rejected.sum()).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    tokens, mask = batch["tokens"], batch["loss_mask"]
    full = sequence_logprobs(model(tokens[:, :-1]), tokens[:, 1:], mask[:, 1:])
    (full[:2].sum() - 2 * full[2:].sum()).backward()
    assert torch.allclose(torch.cat([chosen, rejected]), full, atol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(fast, model.parameters()))


def test_heldout_pairs_keep_limit_per_task_shortest_first(tmp_path):
    import json

    tok = train_tokenizer(["What's 1 + 2? 3\nA long explanation of gravity for a child.\n"] * 4, vocab_size=300)
    rows = [{"prompt": [{"role": "user", "content": f"What's {i} + 1?"}], "chosen": str(i + 1), "rejected": "x" * (i % 3 + 1),
             "task": "arithmetic"} for i in range(10)]
    rows += [{"prompt": [{"role": "user", "content": "Explain gravity " * (i + 1)}], "chosen": "It pulls.",
              "rejected": "Spacetime curvature.", "task": "explain"} for i in range(2)]
    path = tmp_path / "pref_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader, tasks = heldout_pairs(path, tok, max_len=64, limit=4, batch_size=3)
    assert sorted(tasks) == ["arithmetic"] * 4 + ["explain"] * 2  # at most 4 of each task
    lengths = [max(len(c), len(r)) for c, r, _, _ in loader.dataset]
    assert lengths == sorted(lengths) and tasks[-2:] == ["explain", "explain"]  # shortest first, tasks aligned
    assert [len(b["tokens"]) for b in loader] == [6, 6]  # 3 pairs a batch: chosen then rejected rows
    assert len(heldout_pairs(path, tok, max_len=64)[1]) == 12  # limit 0: every pair


def test_win_rate_counts_ties_half_and_balances_tasks():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.5, 5.0])
    base = torch.tensor([1.0, 1.0, 4.0, 0.0, 1.0])
    tasks = ["arithmetic", "arithmetic", "arithmetic", "explain", "explain"]
    w = win_rate(scores, base, tasks)
    # arithmetic: tie, win, loss -> (0.5 + 1 + 0) / 3; explain: win, win -> 1; task-balanced mean of the two
    assert w["win_rate_arithmetic"] == pytest.approx(0.5) and w["win_rate_explain"] == 1.0
    assert w["win_rate"] == pytest.approx(0.75) and w["tie_rate"] == pytest.approx((1 / 3 + 0) / 2)
    r = task_balanced("reward", scores, tasks)
    assert r["reward_arithmetic"] == 2.0 and r["reward_explain"] == 2.75 and r["reward"] == pytest.approx(2.375)


def test_task_weighted_passes_draw_each_task_equally_often():
    tasks = ["arithmetic"] * 90 + ["explain"] * 10
    drawn = [tasks[i] for i in ShuffledPasses(100, 200, seed=0, weights=task_weights(tasks))]
    assert len(drawn) == 200 and 70 <= drawn.count("explain") <= 130  # 100 expected; 20 without balancing
    assert task_weights(["a", "a", "b"]).tolist() == [0.5, 0.5, 1.0]
    again = list(ShuffledPasses(100, 200, seed=0, weights=task_weights(tasks)))
    assert [tasks[i] for i in again] == drawn  # the order is a function of the seed alone
    halves = [list(ShuffledPasses(100, 100, 0, 2, rank, task_weights(tasks))) for rank in (0, 1)]
    assert [tasks[i] for pair in zip(*halves) for i in pair] == drawn  # two processes read the one stream
    with pytest.raises(ValueError, match="non-negative"):
        ShuffledPasses(3, 3, 0, weights=torch.tensor([1.0, -1.0, 1.0]))


def test_heldout_loader_puts_every_task_in_the_first_batches():
    # the held-out files are grouped by task: the validations during training read only limit_val_batches batches
    tasks = ["arithmetic"] * 90 + ["docstring"] * 5 + ["explain"] * 5
    batches = list(heldout_loader(tasks, batch_size=16))
    assert {t for t in batches[0] + batches[1]} == {"arithmetic", "docstring", "explain"}  # 2 of 7 batches
    assert sorted(t for b in batches for t in b) == sorted(tasks)  # a whole validation: every item once
    torch.manual_seed(1)
    assert list(heldout_loader(tasks, batch_size=16)) == batches  # one fixed order, whatever the global RNG
    assert [len(b) for b in batches] == [16] * 6 + [4]


def test_sft_raises_exact_match_on_a_toy_arithmetic_set(tmp_path):
    """A tiny model, never trained, answers no sum; fine-tuned on 25 toy sums with the chat loss mask, it answers
    most of them (the toy set is small enough to learn in seconds on a CPU)."""
    L.seed_everything(0, verbose=False)
    qa = [(q, a) for q, a in arithmetic_qa(4) if "+" in q]
    tok = train_tokenizer([f"{q} {a}\n" for q, a in qa] * 4, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=32))
    rows = [{"prompt": q, "answer": a, "task": "arithmetic"} for q, a in qa]

    def exact_match() -> float:
        texts, gens = generate_answers(model, tok, [r["prompt"] for r in rows], 4)
        return answer_metrics(rows, texts, gens)["exact_match_arithmetic"]

    before = exact_match()
    data = SFTDataset([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                       for q, a in qa], tok, max_len=32)
    optim = dict(lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, warmup_steps=10, min_lr_ratio=0.1,
                 max_steps=300)
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(SFTModule(model, optim), DataLoader(data, batch_size=25, shuffle=True,
                                                   collate_fn=lambda b: collate_sft(b, pad_id=tok.pad_id)))
    after = exact_match()
    assert before <= 0.1 and after >= 0.8, (before, after)
    assert math.isfinite(after)
