"""Benchmark: pretraining throughput (tokens/s), MFU and peak memory, Lightning against a bare PyTorch loop.

For each model preset (``conf/model/<name>.yaml``) and precision (fp32 = ``trainer.precision=32-true``, bf16 =
``bf16-mixed``), the same model from the same initial weights is trained on the same batches in two ways:

- **Lightning**: the pretrain stage's own ``PretrainModule`` (``src/llmstages/stages/pretrain.py``) in a
  ``lightning.Trainer`` with the stage's gradient clipping and resumable ``StatefulDataLoader``;
- **bare**: a plain PyTorch loop (no Lightning, Hydra or logger) with the same optimizer, schedule, clipping
  and loader.

Both run with the host-allocator setting every stage run makes (``runtime.keep_freed_host_memory``).

Batches are random windows of a memory-mapped synthetic token file (``TokenWindows``, as the stage reads
``train.bin``): a sparse first-order Markov chain over a 4,096-token vocabulary, which a model can learn
(its entropy is printed), so the loss curves mean something. MFU = training FLOPs per token
(``GPT.flops_per_token``: 6N + 12LDT, PaLM appendix B) x tokens/s / the matrix-multiply peak of that dtype
(``common.matmul_peak``).

A shared machine's speed drifts by more than the effects measured here, so the two loops run **interleaved**
in one process: one bare step between each two Lightning steps (the bare loop runs inside a timing callback,
and the Lightning step's clock restarts after it), so both see the same machine from one step
to the next. Each step is timed from its start to the next one's, loading its batch and every hook included,
and ends with a GPU synchronisation in both loops alike. Tokens/s comes from the median step time (which
ignores the steps slowed by another process); Lightning/bare and Lightning's extra milliseconds per step come
from the total times of the same steps (so the log-interval steps, where Lightning does more, count).
``--control`` adds, in each round, two identical bare loops interleaved the same way: their ratio (A/A) is what
the method reads when there is no Lightning, the error of the Lightning/bare ratio itself.

Each preset runs in **rounds** in one process: in every round, for each precision (the order alternating
between rounds), the matrix-multiply peak of that dtype is measured, then the interleaved pair runs.
Every ratio (Lightning/bare, bf16/fp32, MFU) is taken within a round, and the median over the rounds is
reported with its range. Peak memory comes from a separate two-step Lightning run per preset and precision (the
process's peak resident set on the CPU, peak allocated memory on CUDA).

Then, at the ``small`` preset, 100 steps in fp32 and in bf16 from the same weights and batches: both loss
curves and their largest gap (means over 10 steps) are printed.

bf16 runs by default only where its matrix multiplies are native (CUDA; a CPU with AMX or AVX-512 BF16, as
``trainer.precision=auto`` decides): elsewhere oneDNN emulates them, tens of times slower than fp32.

Prints the machine, a table, and PASS/FAIL lines for: Lightning at most 5% slower than the bare loop at the
pretraining presets, ``small`` and ``base``, in each precision (at ``tiny``, the test-sized model, Lightning's
fixed cost of 1-2 ms per step is 5-10% of a step: printed as INFO); bf16 at least 1.5x fp32 at ``small`` with
matching curves; MFU at ``base`` at least 40% of the bf16 peak (SKIP where bf16 was not run). Exit status 1 if
any fails.

Example::

    python benchmarks/pretrain.py --quick                 # tiny + small, fewer steps and rounds (about 4 min)
    python benchmarks/pretrain.py                         # tiny, small, base; fp32 and bf16 (if native); curves (~20 min)
    python benchmarks/pretrain.py --presets base --precisions bf16 --device cuda   # on a GPU
    python benchmarks/pretrain.py --compile               # also Lightning with trainer.compile=true
    python benchmarks/pretrain.py --presets small,base --control   # with the A/A control of the ratio
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import signal
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
# conf/model preset -> (batch size, sequence length, measured steps, warm-up steps, rounds). The warm-up covers
# the steps in which a loop still takes fresh pages from the kernel: with two models in one process, the bare
# loop took 183,000, 27,000 and 19,000 minor page faults in its first three small steps and 1.36 M and 347,000 in
# its first two base steps, then none (getrusage, 2026-12-01, fp32).
PRESETS = {
    "tiny": (8, 64, 100, 10, 7),     # the tiny experiment's pretrain batch
    "small": (16, 256, 8, 3, 5),     # the default pipeline's pretrain batch
    "base": (8, 512, 3, 2, 3),       # the ~100M GPU preset, a CPU-sized batch
}
# Where Lightning must be at most 5% slower than the bare loop: the pretraining presets. ``tiny`` is the test-sized
# model (conf/model/tiny.yaml: 0.2M parameters, 10-25 ms steps on a CPU), where Lightning's fixed cost per step
# (1-2 ms of Python in its hooks, closure, precision and strategy layers) is itself 5-10% of a step: printed, not
# checked.
OVERHEAD_CHECKED = ("small", "base")
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


def throughput(seconds: list, preset: str) -> float:
    """Tokens/s from the measured steps' wall times: tokens per step / the median step time, which ignores the
    slow steps when another process takes the cores."""
    batch, seq_len = PRESETS[preset][:2]
    return batch * seq_len / float(np.median(seconds))


def bare_steps(tokens: Path, preset: str, precision: str, steps: int, device: str):
    """A plain PyTorch training loop, one step per ``next()``: yields the step's wall time in seconds (loading
    its batch included, queued GPU work waited for) and its loss (a detached 0-d tensor)."""
    import torch

    from llmstages.losses import next_token_loss
    from llmstages.model import GPT
    from llmstages.optim import param_groups
    from llmstages.optim import adamw_with_schedule

    torch.manual_seed(0)
    model = GPT(model_config(preset)).to(device)
    o = optim(steps)
    opt_sched = adamw_with_schedule(param_groups(model, o["weight_decay"]), **o)
    opt, sched = opt_sched["optimizer"], opt_sched["lr_scheduler"]["scheduler"]
    dev_type = torch.device(device).type
    batches = iter(loader(tokens, preset, steps, device))
    for _ in range(steps):
        start = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        yield time.perf_counter() - start, loss.detach()


def lightning_loop(tokens: Path, preset: str, precision: str, steps: int, warmup: int, device: str,
                   compile: bool = False, paired: bool = False) -> dict:
    """Train ``steps`` steps with the pretrain stage's ``PretrainModule`` in a ``lightning.Trainer``; return the
    wall times in seconds of the steps after ``warmup`` (``"lightning"``) and the losses of all steps.

    ``paired``: the bare loop (:func:`bare_steps`, same weights, batches and schedule) runs in the same process,
    one bare step between each two Lightning steps, so both see the same machine from second to second; its
    step times and losses come back as ``"bare"`` and ``"bare_losses"``. A Lightning step is timed from one
    ``on_train_batch_start`` to the next (so it includes loading its batch and every hook), its clock restarted
    after the bare step run in between; each step ends with a GPU synchronisation, in both loops alike.
    """
    import lightning as L
    import torch

    from llmstages.stages.pretrain import PretrainModule

    bare = bare_steps(tokens, preset, precision, steps, device) if paired else None
    dev_type = torch.device(device).type

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list = []
            self.bare: list = []
            self.bare_losses: list = []
            self.losses: list = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            step = trainer.global_step  # steps done; the one that ended here is step - 1
            if warmup < step <= steps:
                self.times.append(time.perf_counter() - self.end)
            if bare is not None and step < steps:
                assert torch.is_grad_enabled() and not torch.is_autocast_enabled(dev_type)
                seconds, loss = next(bare)
                self.bare_losses.append(loss)
                if step >= warmup:
                    self.bare.append(seconds)
            self.end = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(self.losses) < steps:
                self.losses.append(outputs["loss"].detach())

    torch.manual_seed(0)
    batch, seq_len = PRESETS[preset][:2]
    module = PretrainModule(model_config(preset), optim(steps), 1.0, batch * seq_len, compile=compile)
    timer = StepTimer()
    # One step more than timed: the last timed step ends at the next step's on_train_batch_start.
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        precision=PRECISION[precision], max_steps=steps + 1, max_epochs=-1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=10, callbacks=[timer])  # conf/trainer/cpu.yaml's interval
    trainer.fit(module, loader(tokens, preset, steps + 1, device))
    out = {"lightning": timer.times, "losses": [float(v) for v in timer.losses]}
    if paired:
        out.update(bare=timer.bare, bare_losses=[float(v) for v in timer.bare_losses])
        bare.close()  # frees the bare model and optimizer now
    del trainer, module, timer
    gc.collect()  # the Trainer and module hold each other: free both before the next run builds its own
    return out


def control_pair(tokens: Path, preset: str, precision: str, steps: int, warmup: int, device: str) -> float:
    """The A/A control: two identical bare loops (:func:`bare_steps`) interleaved step by step as the paired run
    interleaves the bare and Lightning loops (A in the bare loop's place, first in each pair; B in Lightning's).
    Returns A/B, the ratio of their total times over the steps after ``warmup``: what the method reads as a
    Lightning/bare ratio when there is no Lightning, i.e. its own error from step order and memory placement."""
    a = bare_steps(tokens, preset, precision, steps, device)
    b = bare_steps(tokens, preset, precision, steps, device)
    ta = tb = 0.0
    for i in range(steps):
        sa, sb = next(a)[0], next(b)[0]
        if i >= warmup:
            ta, tb = ta + sa, tb + sb
    a.close(), b.close()
    gc.collect()
    return ta / tb


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
    from llmstages.runtime import keep_freed_host_memory

    quiet()
    keep_freed_host_memory()  # as every stage run does (Stage): both loops get it
    preset, device, tokens = job["preset"], job["device"], Path(job["tokens"])
    steps, warmup, precisions = job["steps"], job["warmup"], job["precisions"]
    if job["mode"] == "curves":
        return {p: lightning_loop(tokens, preset, p, steps, 0, device)["losses"] for p in ("fp32", "bf16")}
    if job["mode"] == "memory":
        lightning_loop(tokens, preset, precisions[0], steps, warmup, device)
        return {"peak_mb": peak_memory_mb(device)}
    out = {p: {"bare": [], "lightning": [], "ratio": [], "cost_ms": [], "compiled": [], "peak": [], "control": []}
           for p in precisions}
    for r in range(job["rounds"]):
        for precision in (precisions if r % 2 == 0 else precisions[::-1]):
            o = out[precision]
            o["peak"].append(matmul_peak(getattr(torch, DTYPE[precision]), device, seconds=job["peak_seconds"]))
            run = lightning_loop(tokens, preset, precision, steps, warmup, device, paired=True)
            o["bare"].append(throughput(run["bare"], preset))
            o["lightning"].append(throughput(run["lightning"], preset))
            # Over the same interleaved steps, log-interval steps included: total times and the mean difference.
            o["ratio"].append(sum(run["bare"]) / sum(run["lightning"]))
            o["cost_ms"].append(1e3 * (sum(run["lightning"]) - sum(run["bare"])) / len(run["bare"]))
            o["loss_bare"], o["loss_lightning"] = run["bare_losses"][-1], run["losses"][-1]
            if job["control"]:
                o["control"].append(control_pair(tokens, preset, precision, steps, warmup, device))
    if job["compile"]:
        for precision in precisions:
            run = lightning_loop(tokens, preset, precision, steps + 2, warmup + 2, device, compile=True)
            out[precision]["compiled"].append(throughput(run["lightning"], preset))
    model = GPT(model_config(preset))
    return {"runs": out, "params": model.num_params(non_embedding=False),
            "flops_per_token": model.flops_per_token(PRESETS[preset][1])}


def run_worker(job: dict) -> dict:
    """Run ``job`` in a fresh process (each preset and mode on its own allocator and caches); its last stdout line
    is the JSON result. Killing this script kills the worker too (``subprocess.run`` does on any exception, and
    ``main`` turns SIGTERM into one)."""
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
    ap.add_argument("--precisions", default=None,
                    help="comma-separated, of fp32, bf16 (default: both where bf16 matrix multiplies are native: "
                         "CUDA, or a CPU with AMX or AVX-512 BF16; else fp32 only)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per run (default: per preset)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per preset; medians are reported (default: "
                    + ", ".join(f"{k} {v[4]}" for k, v in PRESETS.items()) + ")")
    ap.add_argument("--curve-steps", type=int, default=None,
                    help=f"fp32 vs bf16 curve length at small (default {CURVE_STEPS}; 0: skip)")
    ap.add_argument("--compile", action="store_true", help="also measure Lightning with torch.compile")
    ap.add_argument("--control", action="store_true",
                    help="in each round, also two identical bare loops interleaved the same way (A/A): the error of "
                         "the Lightning/bare ratio itself (about doubles the time)")
    ap.add_argument("--quick", action="store_true",
                    help="half the steps (at least 4), 3 rounds, 30-step curves; tiny and small unless --presets")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the worker is killed too
    default = "tiny,small" if args.quick else ",".join(PRESETS)
    presets = [p for p in (default if args.presets is None else args.presets).split(",") if p]
    precisions = [p for p in ("fp32" if args.precisions is None else args.precisions).split(",") if p]
    for name, values, allowed in (("preset", presets, PRESETS), ("precision", precisions, PRECISION)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            what = f"unknown {name} {bad[0]!r}" if bad else f"no {name} given"
            ap.error(f"{what}; expected one of {', '.join(allowed)}")
    curve_steps_given = args.curve_steps is not None
    args.curve_steps = CURVE_STEPS if args.curve_steps is None else args.curve_steps
    if args.quick:
        args.curve_steps = min(args.curve_steps, 30)
    if args.steps < 0 or args.rounds < 0 or args.curve_steps < 0:
        ap.error("--steps, --rounds and --curve-steps must be >= 0")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"--device {args.device!r}: expected cpu or cuda")

    import torch

    from llmstages.runtime import resolve_precision

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    print(f"machine: {machine()}")
    native_bf16 = resolve_precision("auto", "gpu" if args.device.startswith("cuda") else "cpu") == "bf16-mixed"
    if args.precisions is None and native_bf16:
        precisions = list(PRECISION)
    elif not native_bf16:
        print("note: this machine has no native bf16 matrix multiply (no AMX or AVX-512 BF16 on this CPU): bf16 is "
              "emulated there, tens of times slower than fp32, so "
              + ("bf16 runs will be very slow" if "bf16" in precisions else
                 "bf16 is not run (--precisions fp32,bf16 runs it anyway)"))
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
                       steps=warmup + steps, warmup=warmup, rounds=rounds, compile=args.compile, control=args.control,
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
                           ratio=runs["ratio"], cost_ms=runs["cost_ms"], control=runs["control"],
                           mfu=[r["flops_per_token"] * t / p for t, p in zip(runs["lightning"], runs["peak"])],
                           peak=runs["peak"], light_runs=runs["lightning"], peak_mb=mem["peak_mb"],
                           loss_bare=runs["loss_bare"], loss_lightning=runs["loss_lightning"])
                rows.append(row)
                print(f"  {preset}/{precision}: Lightning {spread(runs['lightning'], ',.0f')} tok/s, bare "
                      f"{spread(runs['bare'], ',.0f')} tok/s, {PRECISION[precision]} matmul peak "
                      f"{spread([v / 1e9 for v in runs['peak']], ',.0f')} GFLOP/s", flush=True)
            print(f"  ({preset}: {rounds} round{'s' * (rounds > 1)} of {steps} measured steps, "
                  f"{time.time() - t0:.0f} s)", flush=True)
        curves = None
        if curve_steps_given and args.curve_steps and "small" not in presets:
            print("note: --curve-steps applies to the small preset, which is not among --presets: no curves")
        if args.curve_steps and "small" in presets and set(precisions) == set(PRECISION):
            curves = run_worker(dict(mode="curves", preset="small", precisions=precisions, device=args.device,
                                     tokens=str(tokens), steps=args.curve_steps, warmup=0))

    print()
    head = ["preset", "params", "batch x seq", "precision", "bare tok/s", "Lightning tok/s", "Lightning/bare",
            "Lightning ms/step more", "GFLOP/s", "peak GFLOP/s", "MFU", "peak MB", "final loss bare / Lightning"]
    if args.control:
        head.insert(7, "bare/bare (A/A)")
    if args.compile:
        head.insert(8 + args.control, "compiled tok/s")
    table = []
    for r in rows:
        line = [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['seq_len']}", r["precision"],
                f"{r['bare']:,.0f}", f"{r['lightning']:,.0f}", spread(r["ratio"]), spread(r["cost_ms"], ".2f"),
                f"{r['flops_per_token'] * r['lightning'] / 1e9:,.0f}", f"{median(r['peak']) / 1e9:,.0f}",
                spread([100 * m for m in r["mfu"]], ".1f") + "%" if r["precision"] == "fp32" or native_bf16
                else "n/a (emulated)", f"{r['peak_mb']:,.0f}",
                f"{r['loss_bare']:.4f} / {r['loss_lightning']:.4f}"]
        if args.control:
            line.insert(7, spread(r["control"]))
        if args.compile:
            line.insert(8 + args.control, f"{r['compiled']:,.0f} ({r['compiled'] / r['lightning']:.2f}x)")
        table.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    for line in [head, *table]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    print("(medians over the rounds, range in brackets; tokens/s from the median step time, data loading included;"
          " Lightning/bare\nand ms/step from the total times of the same interleaved steps, log-interval steps included;"
          " MFU of the Lightning\nrun against the peak of its dtype measured in the same round; peak MB from a separate"
          " 2-step run)")

    print()
    if args.quick:
        print("(--quick: few steps and rounds, so the verdicts below are indicative; run without --quick for them)")
    for r in rows:
        name, ratio, cost_ms = f"{r['preset']}/{r['precision']}", median(r["ratio"]), median(r["cost_ms"])
        control = f"; A/A control (bare/bare, same method) {spread(r['control'])}" if r["control"] else ""
        text = (f"Lightning at most 5% slower than the bare loop at {name}: {spread(r['ratio'])} "
                f"({cost_ms:.2f} ms more per step{control})")
        if ratio > 1.2:  # Lightning does all the bare loop does, and more
            check(fails, f"Lightning {name}", False,
                  text + " - implausibly fast: too few steps or rounds to measure; raise --steps or --rounds")
        elif r["preset"] in OVERHEAD_CHECKED:
            check(fails, f"Lightning {name}", ratio >= 0.95, text)
        else:
            step_ms = 1e3 * r["batch"] * r["seq_len"] / r["bare"]
            print(f"INFO: Lightning/bare at {name}, the test-sized model: {spread(r['ratio'])}, Lightning's fixed "
                  f"{cost_ms:.2f} ms per step against a {step_ms:.0f} ms step{control} (the 5% check is for "
                  f"{', '.join(OVERHEAD_CHECKED)})")
    by = {(r["preset"], r["precision"]): r for r in rows}
    not_run = "" if "bf16" in precisions else " (bf16 not run)"
    if ("small", "fp32") in by and ("small", "bf16") in by:
        speedup = [b / f for b, f in zip(by["small", "bf16"]["light_runs"], by["small", "fp32"]["light_runs"])]
        check(fails, "bf16 speed-up", median(speedup) >= 1.5,
              f"bf16 at least 1.5x fp32 at small (Lightning): {spread(speedup, '.2f')}x")
    elif "small" in presets:
        print(f"SKIP: bf16 at least 1.5x fp32 at small: needs both precisions{not_run}")
    if not curves and args.curve_steps and "small" in presets:
        print(f"SKIP: fp32 and bf16 loss curves match at small: needs both precisions{not_run}")
    if curves:
        n = len(curves["fp32"])
        means = lambda c: [sum(c[i:i + 10]) / len(c[i:i + 10]) for i in range(0, n, 10)]  # noqa: E731
        gap = max(abs(a - b) for a, b in zip(means(curves["fp32"]), means(curves["bf16"])))
        check(fails, "curves", gap <= CURVE_TOLERANCE and all(math.isfinite(v) for v in curves["bf16"]),
              f"fp32 and bf16 loss curves match over {n} steps at small: largest gap of 10-step means "
              f"{gap:.4f} nats (tolerance {CURVE_TOLERANCE})")
        print("  step  " + "  ".join(f"{min(s + 10, n):>6}" for s in range(0, n, 10)))  # each mean's last step
        for p in ("fp32", "bf16"):
            print(f"  {p}  " + "  ".join(f"{v:6.3f}" for v in means(curves[p])))
    if ("base", "bf16") in by:
        mfu = by["base", "bf16"]["mfu"]
        check(fails, "MFU", median(mfu) >= 0.40,
              f"MFU at base (bf16) at least 40% of the measured bf16 peak: {spread([100 * m for m in mfu], '.1f')}%")
    elif "base" in presets:
        fp32 = (f"; fp32 reached {spread([100 * m for m in by['base', 'fp32']['mfu']], '.1f')}% of the fp32 peak"
                if ("base", "fp32") in by else "")
        print(f"SKIP: MFU at base (bf16) at least 40% of the measured bf16 peak{not_run}{fp32}")
    return 1 if fails else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the worker got it too, and subprocess.run has reaped it
        sys.exit("interrupted")
