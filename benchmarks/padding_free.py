"""Benchmark: SFT and reward-model training steps on padded batches against padding-free ones (``padding_free``).

The same random batches of the built data (``<data-dir>/sft_train.jsonl``: 64 examples a step, the sft stage's
default; ``pref_train.jsonl``: 32 pairs, the reward stage's) are collated two ways: right-padded to the batch's
longest row (``collate_sft``, ``collate_pairs``), and packed into rows of ``max_len`` tokens, each example
attending only to itself (``collate_padding_free``, ``collate_pairs_padding_free``). A step is forward, loss,
backward and an AdamW step of a randomly initialised model of the default architecture (conf/model/small.yaml,
the tokenizer's vocabulary), in float32. Printed per step: milliseconds (mean over ``--steps`` after
``--warmup``), tokens computed (rows x row length, padding included) and, for the first batch, the largest
difference between the two losses (the same examples give the same loss up to rounding).

Needs the data stage's output (``llmstages data`` or ``dvc repro data``); the tokenizer is read from it.

Example::

    python benchmarks/padding_free.py                       # outputs/data, 20 steps each
    python benchmarks/padding_free.py --data-dir /tmp/data --steps 50
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from llmstages.data.datasets import (PreferenceDataset, SFTDataset, collate_padding_free, collate_pairs,
                                     collate_pairs_padding_free, collate_sft)
from llmstages.data.formats import read_canonical
from llmstages.losses import bradley_terry_loss
from llmstages.model import GPT, GPTConfig, ScalarHead
from llmstages.stages.reward import RewardModule
from llmstages.stages.sft import SFTModule
from llmstages.tokenizer import load_tokenizer

from common import machine

ROOT = Path(__file__).resolve().parents[1]


def sft_loss(model, head, c):
    return SFTModule(model, {}).token_losses(c).mean()


def reward_loss(model, head, c):
    module = RewardModule(model, {})
    module.head = head
    return bradley_terry_loss(*module.scores(c).chunk(2))


def time_steps(model, head, loss_fn, batches, warmup: int) -> tuple[float, float]:
    """Mean seconds per step over ``batches[warmup:]``, and the first batch's loss."""
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)
    first = None
    for i, c in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = loss_fn(model, head, c)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / (len(batches) - warmup), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("outputs/data"), help="the data stage's output")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per case (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and left out (default 2)")
    ap.add_argument("--max-len", type=int, default=128, help="row length of packed batches (default 128)")
    args = ap.parse_args()
    missing = [f for f in ("tokenizer.json", "sft_train.jsonl", "pref_train.jsonl") if not (args.data_dir / f).exists()]
    if missing:
        raise SystemExit(f"{args.data_dir}: no {', '.join(missing)} here; run `llmstages data` first or pass --data-dir")
    tok = load_tokenizer(args.data_dir)
    arch = yaml.safe_load((ROOT / "conf/model/small.yaml").read_text())
    arch.update(vocab_size=tok.vocab_size)
    n = args.steps + args.warmup
    g = torch.Generator().manual_seed(0)
    sft = SFTDataset(read_canonical(args.data_dir / "sft_train.jsonl", "sft"), tok, args.max_len)
    pref = PreferenceDataset(read_canonical(args.data_dir / "pref_train.jsonl", "preference"), tok, args.max_len)
    cases = [("sft (64 examples)", sft, 64, sft_loss, collate_sft, collate_padding_free),
             ("reward (32 pairs)", pref, 32, reward_loss, collate_pairs, collate_pairs_padding_free)]
    print(f"machine: {machine()}")
    print(f"{'case':<20} {'batches':<13} {'ms/step':>8} {'tokens/step':>12} {'speed-up':>9} {'loss diff':>10}")
    for name, ds, size, loss_fn, padded, free in cases:
        idx = torch.randperm(len(ds), generator=g)[: size * n].view(n, size)
        batches = [[ds[i] for i in row.tolist()] for row in idx]
        results = {}
        for kind, collate in (("padded", partial(padded, pad_id=tok.pad_id)),
                              ("padding-free", partial(free, pad_id=tok.pad_id, max_len=args.max_len))):
            cols = [collate(b) for b in batches]
            torch.manual_seed(0)
            model = GPT(GPTConfig(**arch))
            head = ScalarHead(model.cfg.d_model)
            key = "inputs" if "inputs" in cols[0] else "tokens"
            tokens = sum(c[key].numel() for c in cols[args.warmup:]) / args.steps
            seconds, first = time_steps(model, head, loss_fn, cols, args.warmup)
            results[kind] = (seconds, tokens, first)
        base = results["padded"][0]
        for kind, (seconds, tokens, first) in results.items():
            diff = abs(first - results["padded"][2])
            print(f"{name:<20} {kind:<13} {1000 * seconds:>8.0f} {tokens:>12.0f} {base / seconds:>8.2f}x {diff:>10.1e}")


if __name__ == "__main__":
    main()
