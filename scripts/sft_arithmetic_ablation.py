"""SFT ablation on the arithmetic task alone: a bare loop (no Lightning, no trackers) that fine-tunes a stage
output on the ``sft_train.jsonl`` rows of a data folder and prints held-out exact match every ``--every`` steps.

It measures how fast a starting model learns the sums under a given learning rate and batch size; the ablation
table in docs/results.md was made with it. Same model, loss and schedule as the sft stage
(AdamW, linear warmup, cosine decay to 0.1 x lr, gradient clipping 1.0, bf16 autocast or ``--fp32``); random batches.

    python scripts/sft_arithmetic_ablation.py --init outputs/pretrain --data outputs/data --lr 5e-4 --steps 1000
    python scripts/sft_arithmetic_ablation.py --fresh 256,4,4 --lr 1e-3 --steps 1500   # no pretraining
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from llmstages.checkpoint import load_output
from llmstages.evaluation import generate_answers, normalise
from llmstages.losses import next_token_loss
from llmstages.model import GPT, GPTConfig
from llmstages.optim import param_groups
from llmstages.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--init", default="outputs/pretrain", help="stage output to start from (default: %(default)s)")
    p.add_argument("--fresh", default="", metavar="D,L,H", help="start from a random model of width D, L layers, H heads")
    p.add_argument("--data", default="outputs/data", help="data stage output (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    p.add_argument("--all-tasks", action="store_true", help="train on every SFT row, not only the arithmetic ones")
    p.add_argument("--heldout", type=int, default=500, help="held-out arithmetic questions scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="train and evaluate in float32 (default: bf16 autocast)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.data)
    if a.fresh:
        d, n_layers, n_heads = map(int, a.fresh.split(","))
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=d, n_layers=n_layers, n_heads=n_heads))
    else:
        model = load_output(a.init)[0]
    rows = [json.loads(line) for line in open(f"{a.data}/sft_train.jsonl", encoding="utf-8")]
    rows = rows if a.all_tasks else [r for r in rows if r["task"] == "arithmetic"]
    val = [json.loads(line) for line in open(f"{a.data}/prompts_val.jsonl", encoding="utf-8")]
    val = [r for r in val if r["task"] == "arithmetic"][:a.heldout]
    enc = [tok.encode_chat(r["messages"]) for r in rows]
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=a.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))

    def exact_match() -> float:
        model.eval()
        with torch.autocast("cpu", torch.bfloat16, enabled=not a.fp32):
            texts, _ = generate_answers(model, tok, [r["prompt"] for r in val], 6)
        model.train()
        return sum(normalise(t) == r["answer"] for t, r in zip(texts, val)) / len(val)

    rng, order, t0 = random.Random(a.seed), [], time.time()
    for step in range(1, a.steps + 1):
        if len(order) < a.batch_size:
            order += rng.sample(range(len(enc)), len(enc))
        idx, order = order[:a.batch_size], order[a.batch_size:]
        T = max(len(enc[i][0]) for i in idx)
        ids = torch.tensor([enc[i][0] + [tok.pad_id] * (T - len(enc[i][0])) for i in idx])
        mask = torch.tensor([enc[i][1] + [0] * (T - len(enc[i][1])) for i in idx])
        with torch.autocast("cpu", torch.bfloat16, enabled=not a.fp32):
            loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:], mask[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out exact match {exact_match():.3f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
