"""Benchmark: batched greedy sampling with the KV cache (llmstages.generation.generate) against a careful
hand-written loop without a cache.

The model is a randomly initialised ``llmstages.model.GPT`` with the ``small`` preset's architecture
(conf/model/small.yaml: d_model 256, 4 layers, 4 heads, vocabulary 4096) and a context long enough for the
prompts plus the longest response (``--max-seq-len``, 1024 by default). With the default init (std 0.02, tied
embeddings) a random model only repeats its last prompt token, which would make the token-for-token comparison
vacuous, so the matrices are redrawn with ``--init-std`` (0.1): greedy continuations are then varied (the table
shows the mean number of distinct tokens per response).

Each row of a batch is a prompt of random ids with a random length in ``--prompt-len`` (8..24), so left padding
is exercised. The EOS id is one the model can never emit (-1), so every row generates exactly N tokens.

cached     ``generate(model, prompts, N, eos_id=-1, pad_id=0, temperature=0.0)``: prefill, then one token per
           step against the KV cache.
uncached   the same left-padded prompts (``left_pad``, ``positions_from_mask``); at every step the model runs on
           the whole sequence so far with the same attention mask as ``generate`` (causal, keys restricted to real
           tokens, each padding query attending to itself), the LM head is applied to the last position only,
           argmax, append. Masks and positions are built once for the final length and sliced per step.

Both run under ``torch.inference_mode()`` (``generate`` does so itself) after one untimed warm-up call. Speed is
generated tokens (B * N) per second. A case is repeated (best of ``--repeats``) only while one run takes less than
``--cheap-s`` seconds, so the slow quadratic uncached cases (512 tokens x 16) are measured once. Greedy outputs
are compared token for token; at the first difference the table notes how close the two best logits of the
uncached loop were (a near-tie is rounding, not a bug). The comparison is meant for float32: under ``--bf16`` the
two paths round differently (other matrix shapes; bf16 logits tie often) and their outputs usually part after a
few tokens.

Criterion: the KV cache is at least 5x faster than the uncached loop at 512 new tokens, batch 16, with identical
greedy outputs (PASS/FAIL line; exit code 1 on FAIL).

Example::

    python benchmarks/generate.py --quick                    # 32 and 128 new tokens (under a minute)
    python benchmarks/generate.py                            # 32, 128, 512 x batch 1, 16 (a few minutes on 2 cores)
    python benchmarks/generate.py --new-tokens 512 --batch-sizes 16    # only the criterion's case
    python benchmarks/generate.py --bf16 --quick             # both paths under bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from llmstages.generation import generate, left_pad, positions_from_mask
from llmstages.model import GPT, GPTConfig

from common import machine, sync

EOS_NEVER = -1  # the model never emits it: every row runs to N tokens
PAD = 0
CRIT_N, CRIT_B, CRIT_SPEEDUP = 512, 16, 5.0


def make_model(args) -> GPT:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    max_seq_len=args.max_seq_len)
    model = GPT(cfg)
    if args.init_std > 0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, args.init_std)
    return model.to(args.device).eval()


def make_prompts(batch: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def uncached(model: GPT, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``n`` tokens per prompt, recomputing the whole sequence at every step (no KV cache).

    Returns the generated ids ``(B, n)`` and the gap between the two largest logits at each step ``(B, n)``.
    """
    device = next(model.parameters()).device
    tokens, mask = left_pad(prompts, PAD, device)
    B, P = tokens.shape
    L = P + n
    seq = torch.full((B, L), PAD, dtype=torch.long, device=device)
    seq[:, :P] = tokens
    real = torch.ones(B, L, dtype=torch.bool, device=device)  # generated tokens are real tokens
    real[:, :P] = mask.bool()
    pos = positions_from_mask(real)  # a prefix's positions are the prefix of these
    attn = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None] & real[:, None, :]
    attn |= torch.eye(L, dtype=torch.bool, device=device)[None]  # padding queries attend to themselves
    gaps = torch.empty(B, n, device=device)
    for t in range(n):
        T = P + t
        h = model.hidden(seq[:, :T], positions=pos[:, :T], attn_mask=attn[:, :T, :T])[:, -1]
        logits = model.lm_head(h).float()
        seq[:, T] = logits.argmax(-1)
        top2 = logits.topk(2, dim=-1).values
        gaps[:, t] = top2[:, 0] - top2[:, 1]
    return seq[:, P:], gaps


def timed(fn, device: str, repeats: int, cheap_s: float) -> tuple[float, int, object]:
    """Best wall time of ``fn()`` over up to ``repeats`` runs (only while a run is under ``cheap_s``); returns
    (seconds, runs, result of the first run)."""
    best, runs, first = float("inf"), 0, None
    while runs < repeats:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        dt = time.perf_counter() - t0
        first = out if first is None else first
        best, runs = min(best, dt), runs + 1
        if dt >= cheap_s:
            break
    return best, runs, first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128, CRIT_N], metavar="N",
                    help="response lengths to measure (default: 32 128 512)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, CRIT_B], metavar="B",
                    help="batch sizes to measure (default: 1 16)")
    ap.add_argument("--quick", action="store_true", help="smoke run: only 32 and 128 new tokens")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"),
                    help="prompt lengths drawn uniformly in [MIN, MAX] (default: 8 24)")
    ap.add_argument("--d-model", type=int, default=256, help="model width (default 256, the small preset)")
    ap.add_argument("--n-layers", type=int, default=4, help="layers (default 4)")
    ap.add_argument("--n-heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (default 4096)")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="model context (default 1024)")
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="redraw the weight matrices with this std so greedy output is not a constant "
                         "(default 0.1; 0 keeps the model's own init, under which it repeats the last token)")
    ap.add_argument("--bf16", action="store_true", help="run both paths under torch.autocast(dtype=bfloat16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs for cheap cases (default 3)")
    ap.add_argument("--cheap-s", type=float, default=5.0,
                    help="repeat a case only while one run takes less than this (default 5 s)")
    ap.add_argument("--seed", type=int, default=0, help="model and prompt seed (default 0)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens = [n for n in args.new_tokens if n <= 128] or [32, 128]
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, values in (("--new-tokens", args.new_tokens), ("--batch-sizes", args.batch_sizes),
                         ("--prompt-len", args.prompt_len)):
        if min(values) < 1:
            ap.error(f"{name} {' '.join(map(str, values))}: every value must be >= 1")
    if args.prompt_len[0] > args.prompt_len[1] or args.repeats < 1:
        ap.error("--prompt-len MIN must be <= MAX, and --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    need = args.prompt_len[1] + max(args.new_tokens)
    if need > args.max_seq_len:
        ap.error(f"--max-seq-len {args.max_seq_len} < longest prompt + new tokens = {need}")

    model = make_model(args)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())
    print(f"machine:  {machine()}")
    print(f"model:    GPT d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab "
          f"{args.vocab_size}, context {args.max_seq_len}, {model.num_params() / 1e6:.2f} M non-embedding params, "
          f"init std {args.init_std or 'default'}; {'bf16 autocast' if args.bf16 else 'float32'} on {args.device}")
    print(f"prompts:  lengths {args.prompt_len[0]}..{args.prompt_len[1]} (left-padded), greedy, EOS never emitted")
    print()
    hdr = (f"{'batch':>5} {'new':>5} | {'cached s':>9} {'tok/s':>9} {'runs':>4} | {'uncached s':>10} {'tok/s':>9} "
           f"{'runs':>4} | {'speed-up':>8} | {'identical':>9} {'distinct':>8}")
    print(hdr)
    print("-" * len(hdr))
    results = {}
    with autocast:
        warm = make_prompts(2, *args.prompt_len, args.vocab_size, args.seed)
        generate(model, warm, 8, EOS_NEVER, PAD, temperature=0.0)  # warm-up: allocator, kernels, threads
        uncached(model, warm, 8)
        for B in args.batch_sizes:
            prompts = make_prompts(B, *args.prompt_len, args.vocab_size, args.seed + B)
            for N in args.new_tokens:
                c_s, c_runs, g = timed(lambda: generate(model, prompts, N, EOS_NEVER, PAD, temperature=0.0),
                                       args.device, args.repeats, args.cheap_s)
                if g.responses.shape != (B, N):
                    print(f"error: generate returned responses of shape {tuple(g.responses.shape)}, expected {(B, N)}")
                    return 1
                u_s, u_runs, (ids, gaps) = timed(lambda: uncached(model, prompts, N), args.device, args.repeats,
                                                 args.cheap_s)
                cached_ids = g.responses.to(ids.device)
                same = bool(torch.equal(cached_ids, ids))
                note = ""
                if not same:
                    diff = (cached_ids != ids)
                    row = int(diff.any(1).nonzero()[0])
                    step = int(diff[row].nonzero()[0])
                    note = (f"  first difference: row {row}, token {step}; uncached top-2 logit gap there "
                            f"{float(gaps[row, step]):.2e}; {int(diff.any(1).sum())}/{B} rows differ")
                distinct = sum(len(set(r.tolist())) for r in ids) / B
                results[(B, N)] = (c_s, u_s, same)
                tok = B * N
                print(f"{B:>5} {N:>5} | {c_s:>9.3f} {tok / c_s:>9.0f} {c_runs:>4} | {u_s:>10.3f} {tok / u_s:>9.0f} "
                      f"{u_runs:>4} | {u_s / c_s:>7.1f}x | {'yes' if same else 'NO':>9} {distinct:>8.1f}" + note,
                      flush=True)
    print()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (this run alone adds about "
          f"{min(torch.get_num_threads(), os.cpu_count())}; more means other processes shared the CPU)")
    print("tok/s: generated tokens (batch x new) per second; runs: best of that many; "
          "distinct: mean distinct tokens per response")
    if (CRIT_B, CRIT_N) not in results:
        print(f"SKIP: the criterion needs the {CRIT_N} new tokens x batch {CRIT_B} case "
              f"(run without --quick, with {CRIT_N} in --new-tokens and {CRIT_B} in --batch-sizes)")
        return 0
    c_s, u_s, same = results[(CRIT_B, CRIT_N)]
    ok = same and u_s / c_s >= CRIT_SPEEDUP
    print(f"{'PASS' if ok else 'FAIL'}: KV-cache generation {u_s / c_s:.1f}x faster than uncached at {CRIT_N} new "
          f"tokens, batch {CRIT_B} (need >= {CRIT_SPEEDUP:g}x), greedy outputs "
          f"{'identical' if same else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
