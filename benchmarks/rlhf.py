"""Benchmark: one PPO iteration of the rlhf stage, split into generation, scoring and optimisation.

The setup is the rlhf stage's own (``llmstages.stages.rlhf.build`` with the composed config) but needs no pipeline
outputs: the policy, its reference copy and the reward model (+ ``ScalarHead``) are randomly initialised with the
pretrain stage's model preset (``pretrain.model``, conf/model/small.yaml by default: d_model 256, 4 layers,
4 heads), the tokenizer is a byte-level BPE (``train_tokenizer``, ``data.vocab_size`` = 4096) trained on a few
hundred KB of generated words, and the RL prompts are the data stage's arithmetic questions
(``arithmetic_qa(data.arithmetic_max)``: "What's 7 + 5?", answer "12") written to a temporary
``prompts_train.jsonl``. The model's vocabulary is the tokenizer's, as with ``model.vocab_size: 0``.

The settings are composed from conf/ exactly as ``llmstages params`` does (``conf/config.yaml``; the ``rlhf``
section, validated by ``llmstages.config.validate``), so the defaults are the pipeline's: conf/stage/rlhf.yaml over
conf/rlhf_algorithm/ppo.yaml (rollout_batch_size 32, minibatch_size 16, ppo_epochs 2, max_new_tokens 24,
reward model+exact_match, a separate critic initialised from the reward model). Any Hydra override of the full
config can follow the options, e.g. ``rlhf.ppo.rollout_batch_size=64`` or ``pretrain.model=tiny``;
``rlhf.algorithm=grpo`` times a GRPO iteration instead.

A real ``lightning.Trainer`` runs the module (accelerator and precision from ``rlhf.trainer``: ``auto`` is what
``resolve_precision`` picks, bf16-mixed on CPUs with AMX or AVX-512 BF16; ``--precision`` overrides it) with no
logger, checkpoint or progress bar (and the host-allocator setting of every stage run,
``keep_freed_host_memory``), for ``--warmup`` + ``--iterations`` iterations (``max_steps`` counts optimizer
steps: ppo_epochs * rollout_batch_size / minibatch_size per iteration). The module's own ``PhaseTimer`` splits
each iteration; the warm-up iterations are left out and the measured ones averaged. "other" is the rest of the
training step (statistics, ``log_dict``) and of the Trainer's loop between steps (data loading, hooks).

Example::

    python benchmarks/rlhf.py                                   # the pipeline's PPO defaults
    python benchmarks/rlhf.py --iterations 1 rlhf.ppo.rollout_batch_size=8 rlhf.ppo.minibatch_size=4
    python benchmarks/rlhf.py --precision 32-true rlhf.ppo.rollout_batch_size=64
    python benchmarks/rlhf.py pretrain.model=base rlhf.ppo.max_new_tokens=64
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import machine

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation", "scoring", "optimisation")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def compose(conf: Path, overrides: list[str]):
    """``conf/config.yaml`` + ``overrides``, resolved, as ``llmstages params`` composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def synthetic_text(n_words: int, seed: int) -> list[str]:
    """Lines of Zipf-distributed random lowercase words with some punctuation and numbers (tokenizer sample)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
                  1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    vocab = ["".join(rng.choice(letters, size=int(k), p=p / p.sum())) for k in np.clip(rng.poisson(5, 20_000), 1, 12)]
    ranks = np.arange(1, len(vocab) + 1, dtype=float)
    words = rng.choice(len(vocab), size=n_words, p=ranks**-1.07 / (ranks**-1.07).sum())
    seps = rng.choice([" ", " ", " ", " ", " ", " ", ", ", ". ", "? "], size=n_words)
    text = "".join(vocab[w] + s for w, s in zip(words, seps))
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


class IterationTimes:
    """Lightning callback: per training step (one PPO iteration), the wall time from the end of the previous step
    (so the loop's data loading and hooks count too), the PhaseTimer's seconds spent in it and the tokens sampled."""

    def __init__(self, module) -> None:
        import lightning as L

        outer = self

        class _CB(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.before = dict(pl_module.timer.seconds)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                now = time.perf_counter()
                secs = {k: pl_module.timer.seconds.get(k, 0.0) - outer.before.get(k, 0.0) for k in PHASES}
                outer.rows.append({"wall": now - outer.last, **secs, **outer.sampled})
                outer.last = now

            def on_train_start(self, trainer, pl_module):
                outer.last = time.perf_counter()

        self.callback = _CB()
        self.rows: list[dict] = []
        self.before: dict = {}
        self.sampled: dict = {}
        self.last = 0.0
        rollout = module.rollout

        def counting_rollout(batch):  # record what each iteration sampled
            ro = rollout(batch)
            r = ro["r"]
            self.sampled = {"responses": int(r.tokens.shape[0]), "positions": int(r.responses.numel()),
                            "tokens": int(r.mask.sum()), "eos": int(r.finished.sum())}
            return ro

        module.rollout = counting_rollout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="Hydra overrides of conf/config.yaml, e.g. rlhf.ppo.rollout_batch_size=64 pretrain.model=tiny")
    ap.add_argument("--iterations", type=int, default=3, help="measured iterations, averaged (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="iterations run first and left out (default 1)")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="Lightning precision (default: rlhf.trainer.precision, 'auto' resolved by "
                         "resolve_precision: bf16-mixed with AMX / AVX-512 BF16, else 32-true)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--conf", type=Path, default=ROOT / "conf", help="config folder (default: the repo's conf/)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        ap.error("--iterations must be >= 1 and --warmup >= 0")

    import lightning as L
    import torch

    from llmstages.config import ConfigError, validate
    from llmstages.data.build import arithmetic_qa
    from llmstages.model import GPT, GPTConfig, ScalarHead
    from llmstages.runtime import keep_freed_host_memory, resolve_precision, seed_everything
    from llmstages.stages.rlhf import build
    from llmstages.tokenizer import train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory()  # as the stage's run does
    for msg in (".*treespec.*", ".*module\\(s\\) in eval mode.*", ".*set_vital.*", ".*does not have many workers.*",
                ".*ModelCheckpoint with manual optimization.*"):
        warnings.filterwarnings("ignore", message=msg)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        full = compose(args.conf.resolve(), args.overrides)
        extra = set(full) - set(compose(args.conf.resolve(), []))
        if extra:  # e.g. +trainer.compile=true: a new top-level section that no stage reads
            key = sorted(extra)[0]
            sys.exit(f"rlhf benchmark: override adds top-level key {key!r}, which no stage reads; the rlhf stage's "
                     f"settings are under rlhf., e.g. rlhf.{key}...")
        cfg = validate("rlhf", full.rlhf, source="composed config")
        model_cfg = validate("pretrain", full.pretrain, source="composed config").model
    except ConfigError as err:
        sys.exit(f"rlhf benchmark: {err}")
    except Exception as err:  # Hydra's own errors: unknown key, bad override
        sys.exit(f"rlhf benchmark: {type(err).__name__}: {err}")
    algo = cfg.algorithm
    if algo not in ("ppo", "grpo"):
        sys.exit(f"rlhf benchmark: rlhf.algorithm={algo}: only the on-policy algorithms (ppo, grpo) have phases")
    c = cfg[algo]
    per_iter = (c.ppo_epochs * c.rollout_batch_size if algo == "ppo"
                else c.epochs * c.prompts_per_step * c.group_size) // c.minibatch_size
    precision = resolve_precision(args.precision or cfg.trainer.precision, cfg.trainer.accelerator)

    work = Path(tempfile.mkdtemp(prefix="llmstages-bench-rlhf-"))
    try:
        seed_everything(cfg.trainer.seed)
        t0 = time.perf_counter()
        qa = arithmetic_qa(full.data.arithmetic_max)
        with open(work / "prompts_train.jsonl", "w") as f:
            for q, a in qa:
                f.write(json.dumps({"prompt": q, "answer": a, "task": "arithmetic"}) + "\n")
        tok = train_tokenizer(synthetic_text(60_000, cfg.trainer.seed) + [f"{q} {a}" for q, a in qa],
                              full.data.vocab_size)
        tok_s = time.perf_counter() - t0
        kw = {k: v for k, v in dict(model_cfg).items()}
        kw["vocab_size"] = kw["vocab_size"] or tok.vocab_size
        gcfg = GPTConfig(**kw)
        policy = GPT(gcfg)
        reference = copy.deepcopy(policy)
        reward_model, reward_head = GPT(gcfg), ScalarHead(gcfg.d_model)
        run = build(cfg, policy, reference, reward_model, reward_head, tok, work)
        module, loader = run.module, run.train_dl
        times = IterationTimes(module)
        n_iter = args.warmup + args.iterations
        trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=precision,
                            max_steps=n_iter * per_iter, max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[times.callback], default_root_dir=str(work))

        print(f"machine:   {machine()}")
        print(f"model:     GPT d_model {gcfg.d_model}, {gcfg.n_layers} layers, {gcfg.n_heads} heads, vocab "
              f"{gcfg.vocab_size} (tokenizer trained in {tok_s:.1f} s), context {gcfg.max_seq_len}, "
              f"{policy.num_params() / 1e6:.2f} M non-embedding params; policy, reference, reward model"
              + (", critic" if getattr(module, "critic", None) is not None else ""))
        keys = (["rollout_batch_size", "minibatch_size", "ppo_epochs"] if algo == "ppo"
                else ["prompts_per_step", "group_size", "minibatch_size", "epochs"])
        keys += ["max_new_tokens", "reward"] + (["value_model"] if algo == "ppo" else [])
        print(f"{algo + ':':<11}" + ", ".join(f"{k} {c[k]}" for k in keys)
              + f"; {per_iter} optimizer steps per iteration; {len(qa)} arithmetic prompts")
        print(f"trainer:   {cfg.trainer.accelerator}, precision {precision}, {args.warmup} warm-up + "
              f"{args.iterations} measured iterations (max_steps {n_iter * per_iter})", flush=True)
        t0 = time.perf_counter()
        trainer.fit(module, loader)
        fit_s = time.perf_counter() - t0
        if len(times.rows) != n_iter:
            print(f"error: {len(times.rows)} iterations ran, expected {n_iter} (global_step {trainer.global_step})")
            return 1
        rows = times.rows[args.warmup:]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("wall", *PHASES, "tokens", "positions", "responses",
                                                                    "eos")}
        mean["other"] = mean["wall"] - sum(mean[p] for p in PHASES)
        print()
        label = {"generation": "generation (sampling, KV cache)",
                 "scoring": "scoring (policy" + ("/values" if algo == "ppo" else "") + ", reference, reward)",
                 "optimisation": f"optimisation ({per_iter} optimizer steps)", "other": "other (logging, loop)"}
        hdr = f"{'phase':<42} {'seconds':>8} {'share':>6}   per measured iteration"
        print(hdr)
        print("-" * len(hdr))
        for k in (*PHASES, "other"):
            each = " ".join(f"{r[k]:.2f}" if k != "other" else f"{r['wall'] - sum(r[p] for p in PHASES):.2f}"
                            for r in rows)
            print(f"{label[k]:<42} {mean[k]:>8.2f} {100 * mean[k] / mean['wall']:>5.0f}%   {each}")
        print(f"{'total (one iteration)':<42} {mean['wall']:>8.2f} {100:>5.0f}%   "
              + " ".join(f"{r['wall']:.2f}" for r in rows))
        print()
        print(f"sampled:   {mean['responses']:g} responses x up to {c.max_new_tokens} tokens per iteration: "
              f"{mean['tokens']:g} generated tokens (up to EOS; {mean['eos']:g} responses ended with EOS; "
              f"means over the measured iterations)")
        print(f"speed:     {mean['tokens'] / mean['generation']:.0f} tokens/s while generating, "
              f"{mean['tokens'] / mean['wall']:.0f} tokens/s over the whole iteration, "
              f"{mean['wall']:.2f} s per iteration")
        print(f"fit:       {fit_s:.1f} s for {n_iter} iterations including the Trainer's setup and warm-up")
        print(f"SUMMARY: one {algo.upper()} iteration {mean['wall']:.2f} s = generation "
              f"{100 * mean['generation'] / mean['wall']:.0f}% + scoring {100 * mean['scoring'] / mean['wall']:.0f}% "
              f"+ optimisation {100 * mean['optimisation'] / mean['wall']:.0f}% + other "
              f"{100 * mean['other'] / mean['wall']:.0f}%; "
              f"{mean['tokens'] / mean['generation']:.0f} tokens/s generated")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "algorithm": algo, "precision": precision,
                                             "overrides": args.overrides, "mean": mean, "iterations": rows}, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
