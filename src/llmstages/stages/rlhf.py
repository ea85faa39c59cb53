"""The rlhf stage: the SFT policy improved by PPO, DPO or GRPO (``rlhf.algorithm``), then evaluated side by side
with the SFT model on held-out prompts.

Each algorithm's whole step logic is one short module: :mod:`.ppo`, :mod:`.dpo`, :mod:`.grpo`. This file loads
the models and data, runs the chosen one inside the Lightning Trainer, and evaluates: mean reward-model score,
win rate under the reward model, exact match on held-out arithmetic, mean KL to the reference, response length
and EOS rate, plus a table of sample responses (``samples.md``). The run's time is split into generation,
scoring and optimisation, in the log, the trackers (``time/*``) and ``metrics.json`` (``time_*_s``).
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..checkpoint import load_output, save_output
from ..data.datasets import (PROMPT_FIELDS, PreferenceDataset, PromptDataset, collate_pairs, collate_prompts, read_jsonl,
                             task_balanced_sampler)
from ..data.formats import read_canonical
from ..evaluation import (answer_metrics, eval_subset, generate_answers, heldout_pairs, preference_accuracy, probe_answers,
                          probe_rewards, reward_scores, task_balanced, win_rate)
from ..losses import kl_estimate
from ..model import GPT, ScalarHead
from ..rollout import response_logprobs, sample, sequence_reward_fn
from ..tokenizer import load_tokenizer
from .common import Stage, is_rank_zero, log_encoding, optim_kwargs, seed_everything
from .dpo import DPOModule, OnlineDPOModule
from .grpo import GRPOModule
from .ppo import PPOModule

log = logging.getLogger("llmstages")


@torch.no_grad()
def sequence_kl(policy: GPT, reference: GPT, tok, prompts: list[str], max_new_tokens: int) -> float:
    """Mean KL(policy || reference) per response, in nats: the k3 estimate (unbiased, never negative) summed over
    the tokens of one response sampled from ``policy`` (temperature 1) per prompt, averaged over prompts."""
    r = sample(policy, [tok.encode_prompt(p) for p in prompts], max_new_tokens, tok.eos_id, tok.pad_id)
    logp, _ = response_logprobs(policy, r)
    ref_logp, _ = response_logprobs(reference, r)
    return float((kl_estimate(logp, ref_logp, "k3") * r.mask).sum(1).mean())


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


def build(cfg: DictConfig, policy: GPT, reference: GPT, reward_model: GPT, reward_head: ScalarHead, tok,
          data_dir: Path):
    """The LightningModule of ``cfg.algorithm`` with its training data loader and, for DPO, the held-out pairs'
    loader (``None`` otherwise)."""
    algo, optim, clip = cfg.algorithm, optim_kwargs(cfg), cfg.optim.grad_clip

    def order(tasks: list[str]) -> dict:  # DataLoader arguments: task-balanced draws, or a plain shuffle
        return dict(sampler=task_balanced_sampler(tasks, cfg.trainer.seed)) if cfg.balance_tasks else dict(shuffle=True)
    c = dict(cfg[algo])
    val_dl = None
    if algo == "dpo":  # the held-out pairs: implicit-reward accuracy and margin, offline and online
        pairs = {}
        for split in ("train", "val") if c["pairs"] == "offline" else ("val",):
            path = data_dir / f"pref_{split}.jsonl"
            pairs[split] = PreferenceDataset(read_canonical(path, "preference"), tok, c["max_len"], c["long_prompt"],
                                             str(path))
        log_encoding("dpo", **{k: d.stats for k, d in pairs.items()})
        kw = dict(batch_size=c["batch_size"], collate_fn=partial(collate_pairs, pad_id=tok.pad_id),
                  num_workers=cfg.num_workers)
        val_dl = DataLoader(pairs["val"], **kw)
        if c["pairs"] == "offline":
            train = DataLoader(pairs["train"], drop_last=True, **order(pairs["train"].tasks), **kw)
            return DPOModule(policy, reference, optim, c, clip), train, val_dl
    max_prompt = policy.cfg.max_seq_len - c["max_new_tokens"]
    if max_prompt < 4:
        raise ValueError(f"rlhf.{algo}.max_new_tokens={c['max_new_tokens']} leaves no room for a prompt in the "
                         f"policy's context of {policy.cfg.max_seq_len} tokens")
    prompts = PromptDataset(read_jsonl(data_dir / "prompts_train.jsonl", PROMPT_FIELDS), tok, max_prompt)
    reward_fn = sequence_reward_fn(c["reward"], tok, reward_model, reward_head, c["exact_match_weight"],
                                   tuple(c["verifiable_tasks"]))
    module_cls = {"ppo": PPOModule, "grpo": GRPOModule, "dpo": OnlineDPOModule}[algo]
    n = c["rollout_batch_size"] if algo == "ppo" else c["prompts_per_step"]  # prompts per iteration
    loader = DataLoader(prompts, batch_size=n, drop_last=True, collate_fn=collate_prompts,
                        **order([p["task"] for p in prompts.items]))
    frozen = (reward_model, reward_head) if "model" in c["reward"] else ()
    critic = {}
    if algo == "ppo" and c["value_model"] == "reward_model":  # a separate critic initialised from the RM
        critic = dict(critic=copy.deepcopy(reward_model).requires_grad_(True).train(),
                      critic_head=copy.deepcopy(reward_head).requires_grad_(True).train())
    module = module_cls(policy, reference, reward_fn, optim, c, clip, frozen, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        **critic)
    return module, loader, val_dl


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train the SFT policy with ``cfg.algorithm``; return held-out metrics of SFT and RLHF side by side."""
    seed_everything(cfg.trainer.seed)
    if cfg.trainer.compile:
        log.warning("trainer.compile: not used by rlhf (rollout shapes change every step); running eagerly")
    data_dir, sft_dir, rm_dir = Path(cfg.data_dir), Path(cfg.policy_from), Path(cfg.reward_from)
    policy, _, _ = load_output(sft_dir)
    reference, _, _ = load_output(sft_dir)
    reward_model, reward_head, _ = load_output(rm_dir, with_head=True)
    tok = load_tokenizer(sft_dir)
    module, train_dl, val_dl = build(cfg, policy, reference, reward_model, reward_head, tok, data_dir)
    rows = eval_subset(read_jsonl(data_dir / "prompts_val.jsonl", PROMPT_FIELDS), cfg.eval_limit)
    max_new = cfg.eval_max_new_tokens
    pairs, pair_tasks = heldout_pairs(data_dir / "pref_val.jsonl", tok, policy.cfg.max_seq_len)
    if is_rank_zero():  # under DDP the other processes only train
        sft_m, sft_scores, sft_texts = heldout_eval(reference, reward_model, reward_head, tok, rows, max_new, pairs,
                                                    pair_tasks)

    stage = Stage("rlhf", cfg, out_dir, inputs=[data_dir, sft_dir, rm_dir])
    trainer = stage.trainer(gradient_clip_val=None, **({} if val_dl else {"limit_val_batches": 0}))
    resumed = stage.fit(trainer, module, train_dl, val_dl)
    if trainer.is_global_zero:
        log.info("rlhf (%s) time: %s", cfg.algorithm, module.timer.summary())
    extra = {}
    if val_dl is not None:  # DPO: implicit-reward accuracy and margin over all held-out pairs
        trainer.limit_val_batches = 1.0
        final = trainer.validate(module, val_dl, verbose=False)[0]
        extra = {"dpo_val_accuracy": final["val/accuracy"], "dpo_val_reward_margin": final["val/reward_margin"]}
    if not trainer.is_global_zero:
        return {}  # another DDP process: rank 0 evaluates and writes the output
    rl_m, rl_scores, rl_texts = heldout_eval(policy, reward_model, reward_head, tok, rows, max_new, pairs, pair_tasks)
    wins = win_rate(rl_scores, sft_scores, [r["task"] for r in rows])
    prompts = [r["prompt"] for r in rows]
    metrics = {**{f"rlhf_{k}": v for k, v in rl_m.items()}, **{f"sft_{k}": v for k, v in sft_m.items()},
               **{k.replace("_rate", "_rate_vs_sft", 1): v for k, v in wins.items()},
               "rlhf_kl_to_ref": sequence_kl(policy, reference, tok, prompts, max_new), "sft_kl_to_ref": 0.0,
               "algorithm": cfg.algorithm, "steps": trainer.global_step, "resumed_from_step": resumed,
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
    head = module.value_head if isinstance(module, PPOModule) and module.critic is None else None  # on the policy
    save_output(out_dir, policy, tok, stage.meta(metrics=metrics), head=head)
    return stage.finish(metrics, artifacts=[samples])
