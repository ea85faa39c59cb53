"""The rlhf stage: the SFT policy improved by PPO, DPO or GRPO (``rlhf.algorithm``), then evaluated side by side
with the SFT model on held-out prompts.

Each algorithm's whole step logic is one short module: :mod:`.ppo`, :mod:`.dpo`, :mod:`.grpo`. This file loads
the models and data, runs the chosen one inside the Lightning Trainer, and evaluates: mean reward-model score,
win rate under the reward model, exact match on held-out arithmetic, mean KL to the reference, response length
and EOS rate, plus a table of sample responses (``samples.md``). The run's time is split into generation,
scoring and optimisation, in the log, the trackers (``time/*``) and ``metrics.json`` (``time_*_s``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..checkpoint import save_output
from ..lora import AdaptersOff, LoRA, add_lora, parameter_counts, unload
from ..export import load_model
from ..data.datasets import PROMPT_FIELDS, read_jsonl
from ..evaluation import (answer_metrics, eval_subset, generate_answers, heldout_pairs, preference_accuracy, probe_answers,
                          probe_rewards, reward_scores, task_balanced, win_rate)
from ..losses import kl_estimate
from ..model import GPT, ScalarHead
from ..optim import optim_kwargs
from ..rollout import RLInputs, RLRun, response_logprobs, sample
from ..runtime import is_rank_zero, seed_everything
from . import dpo, grpo, ppo
from .stage import Stage, check_positions

log = logging.getLogger("llmstages")


@torch.no_grad()
def sequence_kl(policy: GPT, reference: GPT, tok, prompts: list[str], max_new_tokens: int, seed: int = 0
                ) -> torch.Tensor:
    """KL(policy || reference) of each prompt's response ``(n,)``, in nats: the k3 estimate (unbiased, never
    negative) summed over the tokens of one response sampled from ``policy`` (temperature 1, a generator seeded
    with ``seed``)."""
    generator = torch.Generator(next(policy.parameters()).device).manual_seed(seed)
    r = sample(policy, [tok.encode_prompt(p) for p in prompts], max_new_tokens, tok.eos_id, tok.pad_id,
               generator=generator)
    logp, _ = response_logprobs(policy, r)
    ref_logp, _ = response_logprobs(reference, r)
    return (kl_estimate(logp, ref_logp, "k3") * r.mask).sum(1).cpu()


def heldout_eval(model: GPT, reward_model: GPT, reward_head: ScalarHead, tok, rows: list[dict],
                 max_new_tokens: int, pairs: DataLoader, pair_tasks: list[str]) -> tuple[dict, torch.Tensor, list[str]]:
    """Greedy responses on held-out prompts: answer metrics, the task-balanced reward-model score
    (:func:`~llmstages.evaluation.task_balanced`), preference accuracy on the held-out ``pairs``; and the
    per-prompt scores ``(n,)`` and texts."""
    texts, gens = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    scores = torch.cat([reward_scores(reward_model, reward_head, g.tokens, g.attention_mask) for g in gens])
    metrics = {**answer_metrics(rows, texts, gens), **task_balanced("reward", scores, [r["task"] for r in rows]),
               **preference_accuracy(model, pairs, pair_tasks)}
    return metrics, scores, texts


ALGORITHMS = {"ppo": ppo.build, "dpo": dpo.build, "grpo": grpo.build}
"""``rlhf.algorithm`` -> its ``build(settings, inputs) -> RLRun``; the settings are the typed section of the same
name (``rlhf.ppo``: :class:`~llmstages.config.PPOSchema`, ...)."""


def build(cfg: DictConfig, policy: GPT, reference: GPT, reward_model: GPT, reward_head: ScalarHead, tok,
          data_dir: Path) -> RLRun:
    """The LightningModule of ``cfg.algorithm`` with its loaders (:class:`~llmstages.rollout.RLRun`)."""
    t, lora = cfg.trainer, LoRA(**cfg.lora)
    inputs = RLInputs(policy, reference, reward_model, reward_head, tok, data_dir, optim_kwargs(cfg),
                      cfg.optim.grad_clip, t.seed, t.max_steps, t.accumulate_grad_batches, cfg.balance_tasks,
                      cfg.num_workers, lora.kwargs() if lora.on else None)
    return ALGORITHMS[cfg.algorithm](OmegaConf.to_object(cfg[cfg.algorithm]), inputs)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train the SFT policy with ``cfg.algorithm``; return held-out metrics of SFT and RLHF side by side."""
    seed_everything(cfg.trainer.seed)
    if cfg.trainer.compile:
        log.warning("trainer.compile: not used by rlhf (rollout shapes change every step); running eagerly")
    data_dir, sft_dir, rm_dir = Path(cfg.data_dir), Path(cfg.policy_from), Path(cfg.reward_from)
    policy, _, tok = load_model(sft_dir)  # stage outputs, or Hugging Face Llama folders
    lengths = {k: cfg[cfg.algorithm][k] for k in ("max_len", "max_new_tokens") if k in cfg[cfg.algorithm]}
    check_positions(f"rlhf.{cfg.algorithm}", policy.cfg.max_seq_len, sft_dir, **lengths)
    lora = LoRA(**cfg.lora)
    if lora.on:  # the policy trains adapters only; the reference is the policy with them off (no second copy)
        reference = AdaptersOff(add_lora(policy, **lora.kwargs()))
    else:
        reference, _, _ = load_model(sft_dir)
    reward_model, reward_head, _ = load_model(rm_dir, with_head=True)
    algo = build(cfg, policy, reference, reward_model, reward_head, tok, data_dir)
    module = algo.module
    rows = eval_subset(read_jsonl(data_dir / "prompts_val.jsonl", PROMPT_FIELDS), cfg.eval_limit)
    max_new = cfg.eval_max_new_tokens
    pairs, pair_tasks = heldout_pairs(data_dir / "pref_val.jsonl", tok, policy.cfg.max_seq_len, cfg.eval_limit)
    if is_rank_zero():  # under DDP the other processes only train
        sft_m, sft_scores, sft_texts = heldout_eval(reference, reward_model, reward_head, tok, rows, max_new, pairs,
                                                    pair_tasks)

    stage = Stage("rlhf", cfg, out_dir, inputs=[data_dir, sft_dir, rm_dir])
    manual = {} if module.automatic_optimization else {"gradient_clip_val": None}  # the module clips itself
    trainer = stage.trainer(**manual, **({} if algo.val_dl else {"limit_val_batches": 0}))
    resumed = stage.fit(trainer, module, algo.train_dl(trainer.world_size, trainer.global_rank), algo.val_dl)
    if trainer.is_global_zero:
        log.info("rlhf (%s) time: %s", cfg.algorithm, module.timer.summary())
    extra = algo.final_metrics(trainer)
    if not trainer.is_global_zero:
        return {}  # another DDP process: rank 0 evaluates and writes the output
    rl_m, rl_scores, rl_texts = heldout_eval(policy, reward_model, reward_head, tok, rows, max_new, pairs, pair_tasks)
    prompts, tasks = [r["prompt"] for r in rows], [r["task"] for r in rows]
    wins = win_rate(rl_scores, sft_scores, tasks)
    kl = sequence_kl(policy, reference, tok, prompts, max_new, cfg.trainer.seed)
    kl_by_task = task_balanced("rlhf_kl_to_ref", kl, tasks)  # each task's mean, and the mean of those
    metrics = {**{f"rlhf_{k}": v for k, v in rl_m.items()}, **{f"sft_{k}": v for k, v in sft_m.items()},
               **{k.replace("_rate", "_rate_vs_sft", 1): v for k, v in wins.items()},
               **kl_by_task, "rlhf_kl_to_ref_task_balanced": kl_by_task["rlhf_kl_to_ref"],
               "rlhf_kl_to_ref": float(kl.mean()), "sft_kl_to_ref": 0.0,  # over the held-out prompts, as training logs
               "algorithm": cfg.algorithm, "steps": trainer.global_step, "resumed_from_step": resumed,
               **parameter_counts(policy),
               **extra, **{f"time_{k}_s": round(v, 1) for k, v in module.timer.seconds.items()}}
    samples = out_dir / "samples.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| prompt | answer | SFT | RLHF |", "|---|---|---|---|"]
    for row, s, r in list(zip(rows, sft_texts, rl_texts))[:50]:
        cells = [row["prompt"], row.get("answer", ""), s, r]
        lines.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
    samples.write_text("\n".join(lines) + "\n")
    probes = list(cfg.probes.prompts)
    probe_texts, probe_gen = probe_answers(policy, tok, probes, cfg.probes.max_new_tokens, chat=True)
    stage.log_probes(probes, probe_texts, probe_rewards(reward_model, reward_head, probe_gen))
    save_output(out_dir, unload(policy, out_dir), tok, stage.meta(metrics=metrics), head=algo.saved_head)
    return stage.finish(metrics, artifacts=[samples])
