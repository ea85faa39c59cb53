"""Benchmark: llmstages' causal LM against what a user would pick instead, side by side in one process.

Contenders, each trained from its own seeded initial weights on the same batches of the same synthetic tokens
(random token ids: only speed is measured here) with AdamW (fused where the device has it), gradient clipping
and the same precision (fp32, or bf16 autocast with float32 weights):

- **llmstages**: ``llmstages.model.GPT`` with the pretrain stage's loss (``next_token_loss``: float32
  cross-entropy), eager;
- **llmstages compiled** (``--compile``): the same under ``torch.compile``, as ``trainer.compile=true`` runs it;
- **transformers Llama**: Hugging Face ``LlamaForCausalLM`` with the same shapes (RoPE, RMSNorm, SwiGLU, tied
  embeddings; the ``sdpa`` attention), its own loss (``labels``);
- **lean GPT-2**: a plain PyTorch GPT-2 written here in the style of the leanest public GPT code (learned
  positions, LayerNorm, GELU MLP of 4 x d_model, fused QKV, ``scaled_dot_product_attention``, tied
  embeddings): the nanoGPT-style reference of issue 22. Where the default SwiGLU width (8/3 x d_model rounded up
  to 64) does more MLP FLOPs than GPT-2's 4 x d_model (3% more at d_model 256), llmstages also runs at the
  width rounded down to 8 (**llmstages d_ff 680**), and the check compares that one: the same work per token.

All are trained in bare PyTorch loops (Lightning's own cost is measured by ``benchmarks/pretrain.py``: Lightning
against the same bare loop is 1.00 at the ``small`` preset). A shared machine's speed drifts by more than the
gaps measured, so the loops run **interleaved**: one step of each in turn, every step timed from its start to
its end with a GPU synchronisation; tokens/s comes from each contender's median step. MFU = (6 N + 12 L D T)
FLOPs per token (PaLM appendix B, N = non-embedding parameters + the tied output layer, as
``GPT.flops_per_token``) x tokens/s / the matrix-multiply peak of the dtype measured in the same run
(``common.matmul_peak``). Peak memory (CUDA only): the peak allocated during that contender's steps.

Presets: ``cpu`` = nanoGPT's CPU shapes and the default pipeline's pretraining batch (4 layers, d_model 256, 4
heads, batch 16 x 256, vocabulary 4,096); ``gpt2`` = GPT-2-small shapes (12 layers, d_model 768, 12 heads,
batch 16 x 1,024, vocabulary 4,096) for a GPU.

Prints the machine, one table per precision, and PASS/FAIL: llmstages eager at least 1.0x the lean GPT-2 in
each precision (at GPT-2's MLP FLOPs), and (where bf16 is native: CUDA, or a CPU with AMX / AVX-512 BF16) llmstages bf16 at least 1.5x
its fp32. Exit status 1 if any fails.

Example::

    python benchmarks/versus.py                                   # cpu preset, fp32 and bf16 where native
    python benchmarks/versus.py --device cuda --preset gpt2 --compile --precisions bf16
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from common import machine, matmul_peak, sync

PRESETS = {  # layers, d_model, heads, batch, seq_len, vocabulary
    "cpu": (4, 256, 4, 16, 256, 4096),
    "gpt2": (12, 768, 12, 16, 1024, 4096),
}


class LeanBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LeanGPT2(nn.Module):
    """GPT-2 in plain PyTorch: token + learned position embeddings, pre-LayerNorm blocks, tied output layer."""

    def __init__(self, layers: int, d: int, heads: int, seq_len: int, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(LeanBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(self.ln_f(h)).float().flatten(0, 1), y.flatten())


def flops_per_token(model: nn.Module, layers: int, d: int, seq_len: int, vocab: int) -> float:
    """6 N + 12 L D T with N the parameters outside the embeddings plus the (tied) output layer."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "wte" not in name
            and "wpe" not in name) + vocab * d
    return 6 * n + 12 * layers * d * seq_len


def matched_d_ff(d: int) -> int:
    """The SwiGLU width (a multiple of 8) whose three matrices have at most GPT-2's 4 x d MLP's two: 8/3 x d
    rounded down (680 at d 256, where the default rounds up to 704: 3% more MLP FLOPs; 2,048 at d 768, the
    default)."""
    return 8 * (8 * d // 3 // 8)


def contenders(preset: str, device: str, compile_: bool) -> dict:
    """``{name: (loss_fn(x, y) -> scalar, model)}`` for each contender, fresh weights, on ``device``."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        sys.exit("benchmarks/versus.py compares against transformers' Llama, which is not installed: "
                 "pip install -e '.[hf]'")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from llmstages.losses import next_token_loss
    from llmstages.model import GPT, GPTConfig

    layers, d, heads, _, seq_len, vocab = PRESETS[preset]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=seq_len)).to(device)
    out = {"llmstages": (lambda x, y, m=ours: next_token_loss(m(x), y), ours)}
    if (width := matched_d_ff(d)) != ours.cfg.d_ff:  # the default SwiGLU width has more MLP FLOPs than GPT-2's
        torch.manual_seed(0)
        same = GPT(GPTConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=seq_len,
                             d_ff=width)).to(device)
        out[f"llmstages d_ff {width}"] = (lambda x, y, m=same: next_token_loss(m(x), y), same)
    if compile_:
        torch.manual_seed(0)
        comp = GPT(ours.cfg).to(device)
        fwd = torch.compile(comp)
        out["llmstages compiled"] = (lambda x, y, f=fwd: next_token_loss(f(x), y), comp)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=ours.cfg.d_ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len,
        tie_word_embeddings=True, attn_implementation="sdpa")).to(device)
    out["transformers Llama"] = (lambda x, y, m=llama: m(input_ids=x, labels=x).loss, llama)
    torch.manual_seed(0)
    lean = LeanGPT2(layers, d, heads, seq_len, vocab).to(device)
    out["lean GPT-2"] = (lambda x, y, m=lean: m(x, y), lean)
    return out


def run(preset: str, precision: str, device: str, steps: int, warmup: int, compile_: bool) -> dict:
    """Interleaved training steps of every contender; ``{name: {tokens_per_s, mfu, peak_mb, ms}}``."""
    layers, d, heads, batch, seq_len, vocab = PRESETS[preset]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, device)
    models = contenders(preset, device, compile_)
    fused = {"fused": True} if device.startswith("cuda") else {}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, **fused) for n, (_, m) in models.items()}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {n: [] for n in models}
    mem = {n: 0.0 for n in models}
    dev_type = torch.device(device).type
    for step in range(warmup + steps):
        xy = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        for name, (loss_fn, model) in models.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
            if device.startswith("cuda"):
                mem[name] = max(mem[name], torch.cuda.max_memory_allocated() / 2**20)
            if not math.isfinite(float(loss.detach())):
                sys.exit(f"{name}: loss {float(loss.detach())} at step {step}")
    out = {}
    for name, (_, model) in models.items():
        s = statistics.median(times[name])
        tps = batch * seq_len / s
        fpt = flops_per_token(model, layers, d, seq_len, vocab)
        out[name] = {"tokens_per_s": tps, "ms": 1000 * s, "mfu": fpt * tps / peak, "peak_mb": mem[name],
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    out["_peak_tflops"] = peak / 1e12
    out["_d_ff"] = models["llmstages"][1].cfg.d_ff
    return out


def native_bf16(device: str) -> bool:
    from llmstages.runtime import resolve_precision

    return device.startswith("cuda") or resolve_precision("auto", "cpu") == "bf16-mixed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default=None, help="comma-separated fp32,bf16 (default: fp32, and bf16 where "
                                                       "native)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per contender (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    ap.add_argument("--compile", action="store_true", help="also llmstages under torch.compile")
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",") if args.precisions else \
        ["fp32"] + ["bf16"] * native_bf16(args.device)
    if bad := [p for p in precisions if p not in ("fp32", "bf16")]:
        ap.error(f"--precisions: unknown {bad}; choose from fp32, bf16")
    torch.set_float32_matmul_precision("high")
    print(f"machine: {machine()}")
    layers, d, heads, batch, seq_len, vocab = PRESETS[args.preset]
    print(f"preset {args.preset}: {layers} layers, d_model {d}, {heads} heads, batch {batch} x {seq_len}, "
          f"vocabulary {vocab}; {args.steps} timed steps each (median), interleaved, on {args.device}")
    results, fails = {}, []
    for precision in precisions:
        r = results[precision] = run(args.preset, precision, args.device, args.steps, args.warmup, args.compile)
        print(f"\n{precision} (matmul peak measured: {r['_peak_tflops']:.2f} TFLOP/s)")
        print(f"  {'contender':<20} {'params':>8} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'vs lean':>8}"
              + (f" {'peak MiB':>9}" if args.device.startswith("cuda") else ""))
        lean = r["lean GPT-2"]["tokens_per_s"]
        for name, v in r.items():
            if name.startswith("_"):
                continue
            print(f"  {name:<20} {v['params_m']:7.2f}M {v['ms']:9.1f} {v['tokens_per_s']:10,.0f} {v['mfu']:6.1%} "
                  f"{v['tokens_per_s'] / lean:7.2f}x" + (f" {v['peak_mb']:9,.0f}" if args.device.startswith("cuda")
                                                          else ""))
        same = next((n for n in r if n.startswith("llmstages d_ff")), "llmstages")  # equal MLP FLOPs
        ratio = r[same]["tokens_per_s"] / lean
        ok = ratio >= 1.0
        fails += [] if ok else [precision]
        print(f"{'PASS' if ok else 'FAIL'}: {same} eager {ratio:.3f}x the lean GPT-2 in {precision} (>= 1.0x, at "
              "GPT-2's MLP FLOPs per token)")
        if same != "llmstages":
            print(f"INFO: llmstages at its default width {r['llmstages']['tokens_per_s'] / lean:.3f}x (its MLP "
                  f"does {3 * r['_d_ff'] / (8 * d) - 1:.0%} more FLOPs than GPT-2's)")
    if "fp32" in results and "bf16" in results and native_bf16(args.device):
        gain = results["bf16"]["llmstages"]["tokens_per_s"] / results["fp32"]["llmstages"]["tokens_per_s"]
        ok = gain >= 1.5
        fails += [] if ok else ["bf16 gain"]
        print(f"{'PASS' if ok else 'FAIL'}: llmstages bf16 {gain:.2f}x its fp32 (>= 1.5x where bf16 is native; "
              "the two precisions ran one after the other)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
