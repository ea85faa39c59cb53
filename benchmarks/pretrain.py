"""Benchmark: pretraining throughput (tokens/s), MFU and peak memory, Lightning against a bare PyTorch loop.

For each model preset (``conf/model/<name>.yaml``) and precision (fp32 = ``trainer.precision=32-true``, bf16 =
``bf16-mixed``), the same model from the same initial weights is trained on the same batches in two ways:

- **Lightning**: the pretrain stage's own ``PretrainModule`` (``src/llmstages/stages/pretrain.py``) in a
  ``lightning.Trainer`` with the stage's gradient clipping and resumable ``StatefulDataLoader``;
- **bare**: a plain PyTorch loop (no Lightning, Hydra or logger) with the same optimizer, schedule, clipping
  and loader.

Both run with the host-allocator setting every stage run makes (``stages.common.keep_freed_host_memory``).

Batches are random windows of a memory-mapped synthetic token file (``TokenWindows``, as the stage reads
``train.bin``): a sparse first-order Markov chain over a 4,096-token vocabulary, which a model can learn
(its entropy is printed), so the loss curves mean something. Tokens/s is measured over the steps after the
warm-up, loading included, from the median step time on the CPU (see ``throughput``). MFU = training FLOPs
per token (``GPT.flops_per_token``: 6N + 12LDT, PaLM appendix B) x tokens/s / the matrix-multiply peak of
that dtype (``common.matmul_peak``).

A shared machine's speed drifts by more than the effects measured here, so each preset runs in **rounds**
in one process: every round measures the bf16 and fp32 matrix-multiply peaks, then runs bare and Lightning in
each precision, the order alternating between rounds. Every ratio (Lightning/bare, bf16/fp32, MFU) is taken
within a round, from runs seconds apart, and the median over the rounds is reported with its range. Peak memory
comes from a separate two-step Lightning run per preset and precision (the process's peak resident set on the
CPU, peak allocated memory on CUDA).

Then, at the ``small`` preset, 100 steps in fp32 and in bf16 from the same weights and batches: both loss
curves and their largest gap (means over 10 steps) are printed.

Prints the machine, a table, and PASS/FAIL lines for: Lightning at most 5% slower than the bare loop (every
preset and precision); bf16 at least 1.5x fp32 at ``small`` with matching curves; MFU at ``base`` at least 40% of
the bf16 peak. Exit status 1 if any fails.

Example::

    python benchmarks/pretrain.py --quick                 # tiny + small, fewer steps and rounds (about 4 min)
    python benchmarks/pretrain.py                         # tiny, small, base; fp32 and bf16; curves (~20 min)
    python benchmarks/pretrain.py --presets base --precisions bf16 --device cuda   # on a GPU
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
# conf/model preset -> (batch size, sequence length, measured steps, warm-up steps, rounds)
PRESETS = {
    "tiny": (8, 64, 100, 10, 7),     # the tiny experiment's pretrain batch
    "small": (16, 256, 8, 2, 5),     # the default pipeline's pretrain batch
    "base": (8, 512, 3, 1, 3),       # the ~100M GPU preset, a CPU-sized batch
}
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
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

    spec = yaml.safe_load((ROOT / "conf/model" / f"{preset}.yaml").read_text())
    spec["vocab_size"] = spec["vocab_size"] or VOCAB
    spec["max_seq_len"] = max(spec["max_seq_len"], PRESETS[preset][1])
    return GPTConfig(**spec)


def optim(max_steps: int) -> dict:
    """The pretrain stage's AdamW and schedule (conf/optim/adamw.yaml with conf/stage/pretrain.yaml's lr)."""
    return dict(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, warmup_steps=min(50, max_steps // 2),
                max_steps=max_steps, min_lr_ratio=0.1)


def loader(tokens: Path, preset: str, steps: int, device: str):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from llmstages.data.datasets import TokenWindows

    batch, seq_len = PRESETS[preset][:2]
    data = TokenWindows(tokens, seq_len, steps * batch, seed=1234)
    return StatefulDataLoader(data, batch_size=batch, shuffle=False, pin_memory=device != "cpu")


def throughput(stamps: list, preset: str, device: str) -> float:
    """Tokens/s from the wall-clock times at which each measured step began, plus the end of the last one. On
    the CPU (where every op has finished when it returns): tokens per step / the median step time, which
    ignores the slow steps when another process takes the cores; on a GPU (asynchronous, so only the whole
    span is honest): all tokens / the whole span."""
    batch, seq_len = PRESETS[preset][:2]
    if device == "cpu":
        return batch * seq_len / float(np.median(np.diff(stamps)))
    return (len(stamps) - 1) * batch * seq_len / (stamps[-1] - stamps[0])


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
    losses, stamps = [], []
    for i, (x, y) in enumerate(loader(tokens, preset, steps, device)):
        if i == warmup:
            sync(device)
        if i >= warmup:
            stamps.append(time.perf_counter())
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
    stamps.append(time.perf_counter())
    return throughput(stamps, preset, device), [float(v) for v in losses]


def lightning_loop(tokens: Path, preset: str, precision: str, steps: int, warmup: int, device: str,
                   compile: bool = False) -> tuple[float, list]:
    """The same with the pretrain stage's ``PretrainModule`` in a ``lightning.Trainer``."""
    import lightning as L
    import torch

    from llmstages.stages.pretrain import PretrainModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list = []
            self.losses: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                sync(device)
            if trainer.global_step >= warmup:
                self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach())
            if trainer.global_step == steps:
                sync(device)
                self.stamps.append(time.perf_counter())

    torch.manual_seed(0)
    batch, seq_len = PRESETS[preset][:2]
    module = PretrainModule(model_config(preset), optim(steps), 1.0, batch * seq_len, compile=compile)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        precision=PRECISION[precision], max_steps=steps, max_epochs=-1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=10, callbacks=[timer])  # conf/trainer/cpu.yaml's interval
    trainer.fit(module, loader(tokens, preset, steps, device))
    return throughput(timer.stamps, preset, device), [float(v) for v in timer.losses]


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def quiet() -> None:
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def worker(job: dict) -> dict:
    """One preset in its own process: ``rounds`` rounds of (peaks; bare and Lightning in each precision)."""
    import torch

    from llmstages.model import GPT
    from llmstages.stages.common import keep_freed_host_memory

    quiet()
    keep_freed_host_memory()  # as every stage run does (Stage): both loops get it
    preset, device, tokens = job["preset"], job["device"], Path(job["tokens"])
    steps, warmup, precisions = job["steps"], job["warmup"], job["precisions"]
    if job["mode"] == "curves":
        return {p: lightning_loop(tokens, preset, p, steps, 0, device)[1] for p in ("fp32", "bf16")}
    if job["mode"] == "memory":
        lightning_loop(tokens, preset, precisions[0], steps, warmup, device)
        return {"peak_mb": peak_memory_mb(device)}
    out = {p: {"bare": [], "lightning": [], "compiled": [], "peak": []} for p in precisions}
    for r in range(job["rounds"]):
        for precision in (precisions if r % 2 == 0 else precisions[::-1]):
            o = out[precision]
            o["peak"].append(matmul_peak(getattr(torch, DTYPE[precision]), device, seconds=job["peak_seconds"]))
            for kind in (("bare", "lightning") if r % 2 == 0 else ("lightning", "bare")):
                run = bare_loop if kind == "bare" else lightning_loop
                tps, losses = run(tokens, preset, precision, steps, warmup, device)
                o[kind].append(tps)
                o[f"loss_{kind}"] = losses[-1]
    if job["compile"]:
        for precision in precisions:
            out[precision]["compiled"].append(
                lightning_loop(tokens, preset, precision, steps + 2, warmup + 2, device, compile=True)[0])
    model = GPT(model_config(preset))
    return {"runs": out, "params": model.num_params(non_embedding=False),
            "flops_per_token": model.flops_per_token(PRESETS[preset][1])}


def run_worker(job: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"worker {job['preset']} ({job['mode']}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def median(values: list) -> float:
    return float(np.median(values))


def spread(values: list, fmt: str = ".3f") -> str:
    """``median (min-max)`` over the rounds."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def check(fails: list, name: str, ok: bool, text: str) -> None:
    fails += [] if ok else [name]
    print(f"{'PASS' if ok else 'FAIL'}: {text}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:" + __doc__.split("Example::")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None,
                    help=f"comma-separated, of {', '.join(PRESETS)} (default: all; tiny,small with --quick)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32, bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per run (default: per preset)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per preset; medians are reported (default: "
                    + ", ".join(f"{k} {v[4]}" for k, v in PRESETS.items()) + ")")
    ap.add_argument("--curve-steps", type=int, default=CURVE_STEPS, help="fp32 vs bf16 curve length (0: skip)")
    ap.add_argument("--compile", action="store_true", help="also measure Lightning with torch.compile")
    ap.add_argument("--quick", action="store_true",
                    help="half the steps, 3 rounds, 30-step curves; tiny and small unless --presets")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    presets = [p for p in (args.presets or ("tiny,small" if args.quick else ",".join(PRESETS))).split(",") if p]
    precisions = [p for p in args.precisions.split(",") if p]
    for name, values, allowed in (("preset", presets, PRESETS), ("precision", precisions, PRECISION)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"unknown {name} {bad[0] if bad else ''!r}; expected one of {', '.join(allowed)}")
    if args.quick:
        args.curve_steps = min(args.curve_steps, 30)
    if args.steps < 0 or args.rounds < 0 or args.curve_steps < 0:
        ap.error("--steps, --rounds and --curve-steps must be >= 0")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"--device {args.device!r}: expected cpu or cuda")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    print(f"machine: {machine()}")
    rows, fails = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "train.bin"
        entropy = markov_tokens(tokens, 2_000_000)
        print(f"data: 2,000,000 synthetic tokens (Markov chain, entropy rate {entropy:.2f} nats/token), memory-mapped")
        for preset in presets:
            batch, seq_len, steps, warmup, rounds = PRESETS[preset]
            steps = args.steps or (max(4, steps // 2) if args.quick else steps)
            rounds = args.rounds or (min(rounds, 3) if args.quick else rounds)
            job = dict(mode="rounds", preset=preset, precisions=precisions, device=args.device, tokens=str(tokens),
                       steps=warmup + steps, warmup=warmup, rounds=rounds, compile=args.compile,
                       peak_seconds=0.3 if args.quick else 0.5)
            t0 = time.time()
            r = run_worker(job)
            for precision in precisions:
                runs = r["runs"][precision]
                mem = run_worker(dict(job, mode="memory", precisions=[precision], steps=2, warmup=1))
                row = dict(preset=preset, precision=precision, batch=batch, seq_len=seq_len, steps=steps,
                           rounds=rounds, params=r["params"], flops_per_token=r["flops_per_token"],
                           bare=median(runs["bare"]), lightning=median(runs["lightning"]),
                           compiled=median(runs["compiled"]) if runs["compiled"] else None,
                           ratio=[a / b for a, b in zip(runs["lightning"], runs["bare"])],
                           mfu=[r["flops_per_token"] * t / p for t, p in zip(runs["lightning"], runs["peak"])],
                           peak=runs["peak"], light_runs=runs["lightning"], peak_mb=mem["peak_mb"],
                           loss_bare=runs["loss_bare"], loss_lightning=runs["loss_lightning"])
                rows.append(row)
                print(f"  {preset}/{precision}: Lightning {spread(runs['lightning'], ',.0f')} tok/s, bare "
                      f"{spread(runs['bare'], ',.0f')} tok/s, {PRECISION[precision]} matmul peak "
                      f"{spread([v / 1e9 for v in runs['peak']], ',.0f')} GFLOP/s", flush=True)
            print(f"  ({preset}: {rounds} rounds of {steps} measured steps, {time.time() - t0:.0f} s)", flush=True)
        curves = None
        if args.curve_steps and "small" in presets and set(precisions) == set(PRECISION):
            curves = run_worker(dict(mode="curves", preset="small", precisions=precisions, device=args.device,
                                     tokens=str(tokens), steps=args.curve_steps, warmup=0))

    print()
    head = ["preset", "params", "batch x seq", "precision", "bare tok/s", "Lightning tok/s", "Lightning/bare",
            "GFLOP/s", "peak GFLOP/s", "MFU", "peak MB", "final loss bare / Lightning"]
    if args.compile:
        head.insert(7, "compiled tok/s")
    table = []
    for r in rows:
        line = [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['seq_len']}", r["precision"],
                f"{r['bare']:,.0f}", f"{r['lightning']:,.0f}", spread(r["ratio"]),
                f"{r['flops_per_token'] * r['lightning'] / 1e9:,.0f}", f"{median(r['peak']) / 1e9:,.0f}",
                spread([100 * m for m in r["mfu"]], ".1f") + "%", f"{r['peak_mb']:,.0f}",
                f"{r['loss_bare']:.4f} / {r['loss_lightning']:.4f}"]
        if args.compile:
            line.insert(7, f"{r['compiled']:,.0f} ({r['compiled'] / r['lightning']:.2f}x)")
        table.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    for line in [head, *table]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    print("(medians over the rounds, range in brackets; ratios and MFU taken within each round; MFU of the Lightning"
          " run against\nthe peak of its dtype measured in the same round; tokens/s include data loading; peak MB from"
          " a separate 2-step run)")

    print()
    if args.quick:
        print("(--quick: few steps and rounds, so the verdicts below are indicative; run without --quick for them)")
    for r in rows:
        check(fails, f"Lightning {r['preset']}/{r['precision']}", median(r["ratio"]) >= 0.95,
              f"Lightning at most 5% slower than the bare loop at {r['preset']}/{r['precision']}: "
              f"{spread(r['ratio'])}")
    by = {(r["preset"], r["precision"]): r for r in rows}
    if ("small", "fp32") in by and ("small", "bf16") in by:
        speedup = [b / f for b, f in zip(by["small", "bf16"]["light_runs"], by["small", "fp32"]["light_runs"])]
        check(fails, "bf16 speed-up", median(speedup) >= 1.5,
              f"bf16 at least 1.5x fp32 at small (Lightning): {spread(speedup, '.2f')}x")
    if curves:
        n = len(curves["fp32"])
        means = lambda c: [sum(c[i:i + 10]) / len(c[i:i + 10]) for i in range(0, n, 10)]  # noqa: E731
        gap = max(abs(a - b) for a, b in zip(means(curves["fp32"]), means(curves["bf16"])))
        check(fails, "curves", gap <= CURVE_TOLERANCE and all(math.isfinite(v) for v in curves["bf16"]),
              f"fp32 and bf16 loss curves match over {n} steps at small: largest gap of 10-step means "
              f"{gap:.4f} nats (tolerance {CURVE_TOLERANCE})")
        print("  step  " + "  ".join(f"{s:>6}" for s in range(10, n + 1, 10)))
        for p in ("fp32", "bf16"):
            print(f"  {p}  " + "  ".join(f"{v:6.3f}" for v in means(curves[p])))
    if ("base", "bf16") in by:
        mfu = by["base", "bf16"]["mfu"]
        check(fails, "MFU", median(mfu) >= 0.40,
              f"MFU at base (bf16) at least 40% of the measured bf16 peak: {spread([100 * m for m in mfu], '.1f')}%")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
