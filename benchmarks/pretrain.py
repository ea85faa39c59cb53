"""Benchmark: pretraining throughput (tokens/s), MFU and peak memory, Lightning against a bare PyTorch loop.

For each model preset (``conf/model/<name>.yaml``) and precision (fp32 = ``trainer.precision=32-true``, bf16 =
``bf16-mixed``), the same model from the same initial weights is trained on the same batches twice, in turns:

- **Lightning**: the pretrain stage's own ``PretrainModule`` (``src/llmstages/stages/pretrain.py``) in a
  ``lightning.Trainer`` with the stage's gradient clipping and resumable ``StatefulDataLoader``;
- **bare**: a plain PyTorch loop (no Lightning, Hydra or logger) with the same optimizer, schedule, clipping
  and loader.

Batches are random windows of a memory-mapped synthetic token file (``TokenWindows``, as the stage reads
``train.bin``): a sparse first-order Markov chain over a 4,096-token vocabulary, which a model can learn
(its entropy is printed), so the loss curves mean something. Tokens/s is measured over the steps after the
warm-up, loading included. MFU = training FLOPs per token (``GPT.flops_per_token``: 6N + 12LDT, PaLM
appendix B) x tokens/s / the matrix-multiply peak measured at the start of the same run for that dtype.
Peak memory is the worker process's peak resident set (CPU) or peak allocated memory (CUDA); each preset and
precision runs in its own process.

Then, at the ``small`` preset, 100 steps in fp32 and in bf16 from the same weights and batches: both loss
curves and their largest gap (means over 10 steps) are printed.

Prints the machine, a table, and PASS/FAIL lines for: Lightning within 5% of the bare loop (every preset); bf16
at least 1.5x fp32 at ``small`` with matching curves; MFU at the larger preset at least 40% of the bf16 peak.

Example::

    python benchmarks/pretrain.py --quick                 # tiny + small, few steps (about 2 min on 2 cores)
    python benchmarks/pretrain.py                         # tiny, small, large (base), fp32 and bf16, curves
    python benchmarks/pretrain.py --presets large --precisions bf16 --device cuda   # on a GPU
    python benchmarks/pretrain.py --compile               # also Lightning with trainer.compile=true
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from common import machine, matmul_peak, sync

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
# name -> (conf/model preset, batch size, sequence length, measured steps, warm-up steps)
PRESETS = {
    "tiny": ("tiny", 8, 64, 200, 20),     # the tiny experiment's pretrain batch
    "small": ("small", 16, 256, 12, 3),   # the default pipeline's pretrain batch
    "large": ("base", 8, 512, 2, 1),      # the ~100M GPU preset, a CPU-sized batch
}
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
CURVE_STEPS, CURVE_TOLERANCE = 100, 0.1  # nats: the largest gap between the 10-step means of the two curves


def markov_tokens(path: Path, n_tokens: int, seed: int = 0, successors: int = 16) -> float:
    """Write ``n_tokens`` uint16 tokens of a random sparse Markov chain to ``path``; return its entropy rate
    in nats/token (the loss a perfect model reaches)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, VOCAB, size=(VOCAB, successors))
    p = 1.0 / np.arange(1, successors + 1)
    p /= p.sum()
    choice = rng.choice(successors, size=n_tokens, p=p)
    rows, out, t = table.tolist(), [0] * n_tokens, 0
    for i, c in enumerate(choice.tolist()):
        t = rows[t][c]
        out[i] = t
    np.asarray(out, dtype=np.uint16).tofile(path)
    return float(-(p * np.log(p)).sum())


def model_config(preset: str):
    from llmstages.model import GPTConfig

    spec = yaml.safe_load((ROOT / "conf/model" / f"{PRESETS[preset][0]}.yaml").read_text())
    spec["vocab_size"] = spec["vocab_size"] or VOCAB
    spec["max_seq_len"] = max(spec["max_seq_len"], PRESETS[preset][2])
    return GPTConfig(**spec)


def optim(max_steps: int) -> dict:
    """The pretrain stage's AdamW and schedule (conf/optim/adamw.yaml with conf/stage/pretrain.yaml's lr)."""
    return dict(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, warmup_steps=min(50, max_steps // 2),
                max_steps=max_steps, min_lr_ratio=0.1)


def loader(tokens: Path, preset: str, steps: int, device: str):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from llmstages.data.datasets import TokenWindows

    _, batch, seq_len, _, _ = PRESETS[preset]
    data = TokenWindows(tokens, seq_len, steps * batch, seed=1234)
    return StatefulDataLoader(data, batch_size=batch, shuffle=False, pin_memory=device != "cpu")


def bare_loop(tokens: Path, preset: str, precision: str, steps: int, warmup: int, device: str) -> tuple[float, list]:
    """Tokens/s over the steps after ``warmup``, and the per-step losses, of a plain PyTorch training loop."""
    import torch

    from llmstages.losses import next_token_loss
    from llmstages.model import GPT, param_groups
    from llmstages.stages.common import adamw_with_schedule

    torch.manual_seed(0)
    model = GPT(model_config(preset)).to(device)
    o = optim(steps)
    opt_sched = adamw_with_schedule(param_groups(model, o["weight_decay"]), **o)
    opt, sched = opt_sched["optimizer"], opt_sched["lr_scheduler"]["scheduler"]
    dev_type = torch.device(device).type
    losses, start = [], None
    for i, (x, y) in enumerate(loader(tokens, preset, steps, device)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device)
    seconds = time.perf_counter() - start
    _, batch, seq_len, _, _ = PRESETS[preset]
    return (steps - warmup) * batch * seq_len / seconds, [float(v) for v in losses]


def lightning_loop(tokens: Path, preset: str, precision: str, steps: int, warmup: int, device: str,
                   compile: bool = False) -> tuple[float, list]:
    """The same with the pretrain stage's ``PretrainModule`` in a ``lightning.Trainer``."""
    import lightning as L
    import torch

    from llmstages.stages.pretrain import PretrainModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.losses: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach())
            if trainer.global_step == steps:
                sync(device)
                self.end = time.perf_counter()

    torch.manual_seed(0)
    _, batch, seq_len, _, _ = PRESETS[preset]
    module = PretrainModule(model_config(preset), optim(steps), 1.0, batch * seq_len, compile=compile)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        precision=PRECISION[precision], max_steps=steps, max_epochs=-1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(module, loader(tokens, preset, steps, device))
    return (steps - warmup) * batch * seq_len / (timer.end - timer.start), [float(v) for v in timer.losses]


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(job: dict) -> dict:
    """One preset and precision, in its own process: bare and Lightning in turns, ``repeats`` times each."""
    import logging
    import warnings

    import torch

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from llmstages.model import GPT

    preset, precision, device, tokens = job["preset"], job["precision"], job["device"], Path(job["tokens"])
    steps, warmup = job["steps"], job["warmup"]
    if job.get("curves"):
        return {p: lightning_loop(tokens, preset, p, steps, 0, device)[1] for p in ("fp32", "bf16")}
    bare, light, compiled = [], [], []
    for _ in range(job["repeats"]):
        tps, bare_losses = bare_loop(tokens, preset, precision, steps, warmup, device)
        bare.append(tps)
        tps, light_losses = lightning_loop(tokens, preset, precision, steps, warmup, device)
        light.append(tps)
    if job.get("compile"):
        compiled.append(lightning_loop(tokens, preset, precision, steps, warmup + 2, device, compile=True)[0])
    cfg = model_config(preset)
    model = GPT(cfg)
    return {"bare": max(bare), "lightning": max(light), "compiled": max(compiled) if compiled else None,
            "params": model.num_params(non_embedding=False),
            "flops_per_token": model.flops_per_token(PRESETS[preset][2]),
            "loss_bare": bare_losses[-1], "loss_lightning": light_losses[-1], "peak_mb": peak_memory_mb(device),
            "threads": torch.get_num_threads()}


def run_worker(job: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"worker {job['preset']}/{job['precision']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example::")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small,large", help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32, bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per run (default: per preset)")
    ap.add_argument("--repeats", type=int, default=3, help="bare/Lightning runs in turns; the best of each counts")
    ap.add_argument("--curve-steps", type=int, default=CURVE_STEPS, help="fp32 vs bf16 curve length (0: skip)")
    ap.add_argument("--compile", action="store_true", help="also measure Lightning with torch.compile")
    ap.add_argument("--quick", action="store_true", help="tiny and small, fewer steps, one repeat, 30-step curves")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    presets = [p for p in args.presets.split(",") if p]
    precisions = [p for p in args.precisions.split(",") if p]
    for name, allowed in (("preset", PRESETS), ("precision", PRECISION)):
        bad = [v for v in (presets if name == "preset" else precisions) if v not in allowed]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r}; expected one of {', '.join(allowed)}")
    if args.quick:
        presets = [p for p in presets if p != "large"] or ["tiny"]
        args.repeats, args.curve_steps = 1, min(args.curve_steps, 30)

    import torch

    print(f"machine: {machine()}")
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, args.device) for p in precisions}
    print("matrix-multiply peak (measured, best square size): " +
          ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peaks.items()))

    rows, fails = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "train.bin"
        entropy = markov_tokens(tokens, 2_000_000)
        print(f"data: 2,000,000 synthetic tokens (Markov chain, entropy rate {entropy:.2f} nats/token), memory-mapped")
        for preset in presets:
            _, batch, seq_len, steps, warmup = PRESETS[preset]
            steps = args.steps or (max(4, steps // 3) if args.quick else steps)
            for precision in precisions:
                job = dict(preset=preset, precision=precision, device=args.device, tokens=str(tokens),
                           steps=warmup + steps, warmup=warmup, repeats=args.repeats, compile=args.compile)
                t0 = time.time()
                r = run_worker(job)
                r.update(preset=preset, precision=precision, batch=batch, seq_len=seq_len, steps=steps,
                         mfu=r["flops_per_token"] * r["lightning"] / peaks[precision], seconds=time.time() - t0)
                rows.append(r)
                print(f"  {preset}/{precision}: Lightning {r['lightning']:,.0f} tok/s, bare {r['bare']:,.0f} tok/s "
                      f"({r['seconds']:.0f} s)", flush=True)
        curves = None
        if args.curve_steps and "small" in presets:
            curves = run_worker(dict(preset="small", precision="", device=args.device, tokens=str(tokens),
                                     steps=args.curve_steps, warmup=0, repeats=1, curves=True))

    print()
    head = ["preset", "params", "batch x seq", "precision", "bare tok/s", "Lightning tok/s", "Lightning/bare",
            "GFLOP/s", "MFU", "peak MB", "final loss bare / Lightning"]
    if args.compile:
        head.insert(7, "compiled tok/s")
    table = []
    for r in rows:
        line = [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['seq_len']}", r["precision"],
                f"{r['bare']:,.0f}", f"{r['lightning']:,.0f}", f"{r['lightning'] / r['bare']:.3f}",
                f"{r['flops_per_token'] * r['lightning'] / 1e9:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_mb']:,.0f}",
                f"{r['loss_bare']:.4f} / {r['loss_lightning']:.4f}"]
        if args.compile:
            line.insert(7, f"{r['compiled']:,.0f} ({r['compiled'] / r['lightning']:.2f}x)")
        table.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    for line in [head, *table]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    print("(MFU of the Lightning run against the measured peak of its dtype; tokens/s include data loading)")

    print()
    for r in rows:
        ratio = r["lightning"] / r["bare"]
        ok = ratio >= 0.95
        fails += [] if ok else [f"Lightning {r['preset']}/{r['precision']}"]
        print(f"{'PASS' if ok else 'FAIL'}: Lightning at most 5% slower than the bare loop at "
              f"{r['preset']}/{r['precision']}: "
              f"{ratio:.3f}")
    by = {(r["preset"], r["precision"]): r for r in rows}
    if ("small", "fp32") in by and ("small", "bf16") in by:
        speedup = by["small", "bf16"]["lightning"] / by["small", "fp32"]["lightning"]
        ok = speedup >= 1.5
        fails += [] if ok else ["bf16 speed-up"]
        print(f"{'PASS' if ok else 'FAIL'}: bf16 at least 1.5x fp32 at small: {speedup:.2f}x "
              f"({by['small', 'bf16']['lightning']:,.0f} vs {by['small', 'fp32']['lightning']:,.0f} tok/s)")
    if curves:
        n = len(curves["fp32"])
        means = lambda c: [sum(c[i:i + 10]) / len(c[i:i + 10]) for i in range(0, n, 10)]  # noqa: E731
        gap = max(abs(a - b) for a, b in zip(means(curves["fp32"]), means(curves["bf16"])))
        ok = gap <= CURVE_TOLERANCE and all(math.isfinite(v) for v in curves["bf16"])
        fails += [] if ok else ["curves"]
        print(f"{'PASS' if ok else 'FAIL'}: fp32 and bf16 loss curves match over {n} steps at small: largest gap "
              f"of 10-step means {gap:.4f} nats (tolerance {CURVE_TOLERANCE})")
        print("  step  " + "  ".join(f"{s:>6}" for s in range(10, n + 1, 10)))
        for p in ("fp32", "bf16"):
            print(f"  {p}  " + "  ".join(f"{v:6.3f}" for v in means(curves[p])))
    if ("large", "bf16") in by:
        mfu = by["large", "bf16"]["mfu"]
        ok = mfu >= 0.40
        fails += [] if ok else ["MFU"]
        print(f"{'PASS' if ok else 'FAIL'}: MFU at the larger preset (bf16) at least 40% of the measured bf16 peak: "
              f"{100 * mfu:.1f}%")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
