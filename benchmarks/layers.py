"""Benchmark: the model's element-wise layers with written-out backward against the autograd composites they
replaced, forward + backward, interleaved in one process.

Each pair computes the same values (the script checks them) at the shapes of one layer of the default pipeline's
pretraining step (``small`` model: batch 16 x 256, d_model 256, 4 heads, SwiGLU width 704, vocabulary 4,096):

- **rotary embeddings** of queries and keys together, ``(2, 16, 4, 256, 64)`` strided views of the fused QKV
  output: :func:`llmstages.model.apply_rope` against ``chunk`` / four multiplies / ``cat`` through autograd;
- **RMSNorm** ``(16, 256, 256)``: :func:`llmstages.model.rms_norm` (the CPU path) against ``F.rms_norm``, whose
  CPU backward is autograd through its composite;
- **SwiGLU** ``(16, 256, 1408) -> (16, 256, 704)``: :func:`llmstages.model.swiglu` against ``chunk``, ``silu``,
  multiply through autograd;
- **cross-entropy** of 4,096 tokens x 4,096 logits: :func:`llmstages.losses.token_cross_entropy` against
  ``F.cross_entropy(reduction="none")``.

Prints the median milliseconds of each (fp32, and bf16 inputs where the layer sees them under autocast), the
speed-up, and the largest difference of the outputs and gradients. The whole training step, before and after,
is ``benchmarks/versus.py`` (against other implementations) and ``benchmarks/pretrain.py``.

Example::

    python benchmarks/layers.py
    python benchmarks/layers.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, sync  # noqa: E402


def rope_autograd(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def swiglu_autograd(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def cases(device: str) -> list[tuple[str, torch.dtype, callable, callable, list]]:
    """``(name, dtype, ours, before, make_inputs)``; ``make_inputs()`` gives fresh leaf tensors."""
    from llmstages.losses import token_cross_entropy
    from llmstages.model import apply_rope, rms_norm, rope_tables, swiglu

    cos, sin = rope_tables(256, 64, 10000.0)
    cos, sin = cos[None, None, None].to(device), sin[None, None, None].to(device)  # (1, 1, 1, T, Dh/2)
    w = (1 + 0.1 * torch.randn(256)).to(device)
    y = torch.randint(0, 4096, (4096,), device=device)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def qkv(dtype=dtype):
            return torch.randn(16, 256, 3, 4, 64, device=device, dtype=dtype).permute(2, 0, 3, 1, 4).detach().requires_grad_()

        out.append(("rotary embeddings", dtype, lambda t: apply_rope(t[:2], cos, sin),
                    lambda t: rope_autograd(t[:2], cos, sin), qkv))
        out.append(("SwiGLU", dtype, swiglu, swiglu_autograd,
                    lambda dtype=dtype: torch.randn(16, 256, 1408, device=device, dtype=dtype).requires_grad_()))
        out.append(("cross-entropy", dtype, lambda t: token_cross_entropy(t, y),
                    lambda t: F.cross_entropy(t.float(), y, reduction="none"),
                    lambda dtype=dtype: torch.randn(4096, 4096, device=device, dtype=dtype).requires_grad_()))
    # RMSNorm sees the float32 residual stream under autocast too
    out.append(("RMSNorm", torch.float32, lambda t: rms_norm(t, w, 1e-5), lambda t: F.rms_norm(t, (256,), w, 1e-5),
                lambda: torch.randn(16, 256, 256, device=device).requires_grad_()))
    return out


def time_pair(ours, before, make, device: str, repeats: int) -> tuple[float, float, float, float]:
    """Median ms of forward + backward of each, interleaved; the largest output and input-gradient differences."""
    x = make()
    g = torch.randn(ours(x).shape, device=x.device)
    times = {"ours": [], "before": []}
    for i in range(repeats + 2):
        for name, fn in (("ours", ours), ("before", before)):
            x.grad = None
            sync(device)
            start = time.perf_counter()
            fn(x).backward(g)
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    x.grad = None
    a = ours(x)
    a.backward(g)
    ga = x.grad.clone()
    x.grad = None
    b = before(x)
    b.backward(g)
    return (1000 * statistics.median(times["ours"]), 1000 * statistics.median(times["before"]),
            float((a.detach().float() - b.detach().float()).abs().max()), float((ga.float() - x.grad.float()).abs().max()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes of each (median)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    print(f"{'layer':20s} {'input':9s} {'ours ms':>8s} {'before ms':>10s} {'speed-up':>9s} "
          f"{'max |dy|':>9s} {'max |dx|':>9s}")
    for name, dtype, ours, before, make in cases(args.device):
        ms, ms_before, dy, dx = time_pair(ours, before, lambda m=make: m(), args.device, args.repeats)
        print(f"{name:20s} {str(dtype).removeprefix('torch.'):9s} {ms:8.2f} {ms_before:10.2f} "
              f"{ms_before / ms:8.2f}x {dy:9.1e} {dx:9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
