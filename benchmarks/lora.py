"""Benchmark: LoRA against full fine-tuning, an SFT step of the model preset (default conf/model/small.yaml).

Each case runs in its own process (so that the peak memory is its own): a model of the preset's architecture
(random weights, float32), full fine-tuning or LoRA adapters (``--r``, alpha 2r, on qkv, proj, gate_up and down),
then ``--steps`` SFT-like steps (forward, cross-entropy, backward, AdamW) on random token batches of
``--batch`` x ``--seq-len``. Printed per case: trainable and total parameters, milliseconds per step (mean over the
steps after the first), and the peak memory: on a GPU the CUDA allocator's peak, on a CPU the process's peak
resident set (ru_maxrss). Both cases import the same libraries (peft and, through it, transformers, about 85 MiB
of resident memory) before measuring, and on a CPU the table also gives the peak above the resident set at the
first step (the model built, adapters added): what training itself needs (gradients, AdamW state, activations).

Example::

    python benchmarks/lora.py                         # small preset, CPU
    python benchmarks/lora.py --device cuda --model base --batch 16 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def case(args: argparse.Namespace, r: int) -> dict:
    import peft  # noqa: F401  # loaded in both cases, so that the peaks compare training, not imports
    import torch
    import yaml

    from llmstages.lora import add_lora, parameter_counts
    from llmstages.model import GPT, GPTConfig

    arch = yaml.safe_load((ROOT / f"conf/model/{args.model}.yaml").read_text())
    arch.update(vocab_size=args.vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**arch)).to(args.device)
    if r:
        add_lora(model, r=r, alpha=2.0 * r, dropout=0.0, target_modules=["qkv", "proj", "gate_up", "down"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=args.device)
    start_rss = resident_mib()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**parameter_counts(model), "ms_per_step": 1000 * sum(times[1:]) / max(1, len(times) - 1),
            "peak_mib": peak, "above_start_mib": None if args.device == "cuda" else peak - start_rss}


def resident_mib() -> float:
    """The process's resident set now, in MiB (Linux /proc; elsewhere its peak so far, ru_maxrss)."""
    import os

    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset of conf/model/ (default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(case(args, args.case)))
        return
    from common import machine

    print(f"machine: {machine()}")
    print(f"model={args.model} batch={args.batch} x {args.seq_len} tokens, float32, {args.device}")
    print(f"{'case':<14} {'trainable':>12} {'total':>12} {'ms/step':>9} {'peak MiB':>9} {'above start':>12}")
    for name, r in (("full", 0), (f"LoRA r={args.r}", args.r)):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", str(r)], capture_output=True,
                             text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        above = "-" if m["above_start_mib"] is None else f"{m['above_start_mib']:.0f}"
        print(f"{name:<14} {m['trainable_params']:>12,} {m['total_params']:>12,} {m['ms_per_step']:>9.0f} "
              f"{m['peak_mib']:>9.0f} {above:>12}")


if __name__ == "__main__":
    main()
