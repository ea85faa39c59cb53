"""GRPO (``rlhf.algorithm=grpo``): Group Relative Policy Optimization, Shao et al. (2024), §4.1 and eq. 3.

For each prompt, ``group_size`` responses are sampled; each response's reward (the reward model's score, or a
verifiable exact-match reward) is normalised within its group to give one advantage for all of its tokens, so
no value model is needed. The loss is the PPO clipped surrogate plus ``kl_coef`` times the k3 estimate of
KL(π || π_ref), averaged over each response's tokens and then over responses. Each rollout batch is used for
``epochs`` passes in minibatches; ``trainer.max_steps`` counts optimizer steps.
"""

from __future__ import annotations


import lightning as L
import torch

from ..losses import group_advantages, grpo_loss, masked_mean, token_entropy
from ..rollout import (PhaseTimer, RewardFn, RLInputs, RLRun, iteration_generator, minibatches, outside_inference,
                       penalised_rewards, response_logprobs, rollout_stats, sample)
from ..config import GRPOSchema, updates_per_iteration
from ..model import GPT, freeze
from ..optim import adamw_with_schedule, manual_step, param_groups


class GRPOModule(L.LightningModule):
    """One training step = one GRPO iteration over ``len(batch)`` prompts x ``group_size`` samples."""

    def __init__(self, policy: GPT, reference: GPT, reward_fn: RewardFn, optim: dict, grpo: GRPOSchema, grad_clip: float,
                 reward_modules: tuple[torch.nn.Module, ...] = (), *, eos_id: int, pad_id: int, seed: int = 0) -> None:
        super().__init__()
        self.policy, self.reference, self.reward_fn = policy, reference, reward_fn
        self.seed = seed  # each iteration draws from iteration_generator(seed, step): resumable with no RNG state
        self.reward_modules = torch.nn.ModuleList(reward_modules)  # used by reward_fn; moved to the device
        freeze(reference, *reward_modules)
        self.optim, self.c, self.grad_clip = optim, grpo, grad_clip
        self.eos_id, self.pad_id = eos_id, pad_id  # generation stops at EOS; finished rows are filled with PAD
        self.timer = PhaseTimer()
        self.automatic_optimization = False

    @torch.no_grad()
    def rollout(self, batch: list[dict], generator: torch.Generator | None = None) -> dict:
        """``group_size`` samples per prompt (groups consecutive; drawn from ``generator``), their rewards
        ``(B*G,)`` and advantages."""
        c, G = self.c, self.c.group_size
        prompts = [b["prompt_ids"] for b in batch for _ in range(G)]
        rows = [b for b in batch for _ in range(G)]
        with self.timer("generation"):
            r = sample(self.policy, prompts, c.max_new_tokens, self.eos_id, self.pad_id, c.temperature,
                       c.top_k, c.top_p, generator)
        with self.timer("scoring"), torch.inference_mode():
            logp, logits = response_logprobs(self.policy, r)
            ref_logp, _ = response_logprobs(self.reference, r)
            score = penalised_rewards(self.reward_fn, r, rows, c.missing_eos_penalty)
            adv = group_advantages(score, G)
            entropy = masked_mean(token_entropy(logits), r.mask)
        scored = dict(logp=logp, ref_logp=ref_logp, score=score, adv=adv, entropy=entropy)
        return dict(r=r, **outside_inference(scored))

    def training_step(self, batch, batch_idx):
        c = self.c
        g = iteration_generator(self.device, self.seed, self.global_step, self.global_rank)
        ro = self.rollout(batch, g)
        r, stats = ro["r"], []
        n = r.tokens.shape[0]
        with self.timer("optimisation"):
            for _ in range(c.epochs):
                for idx in minibatches(n, c.minibatch_size, g):
                    mb = r.rows(idx)
                    logp, _ = response_logprobs(self.policy, mb)
                    loss, clipfrac, kl = grpo_loss(logp, ro["logp"][idx], ro["ref_logp"][idx], ro["adv"][idx], mb.mask,
                                                   c.clip_range, c.kl_coef)
                    manual_step(self, loss, self.grad_clip)
                    stats.append(torch.stack([loss.detach(), clipfrac, kl]))
        loss, cf, kl = torch.stack(stats).mean(0)
        solved = (ro["score"].view(-1, c.group_size).std(1) == 0).float().mean()
        self.log_dict({"train/reward": ro["score"].mean(), "train/kl_per_token": kl, "train/grpo_loss": loss, "train/clipfrac": cf,
                       "train/entropy": ro["entropy"], "train/zero_advantage_groups": solved,
                       **rollout_stats(r, self.timer)}, batch_size=n)
        self.log("reward", ro["score"].mean(), prog_bar=True, logger=False, batch_size=n)

    def configure_optimizers(self):
        return adamw_with_schedule(param_groups(self.policy, self.optim["weight_decay"]), **self.optim)


def build(s: GRPOSchema, x: RLInputs) -> RLRun:
    """GRPO on batches of ``s.prompts_per_step`` training prompts, ``s.group_size`` samples each."""
    module = GRPOModule(x.policy, x.reference, x.reward(s), x.optim, s, x.grad_clip, x.reward_modules(s),
                        eos_id=x.tok.eos_id, pad_id=x.tok.pad_id, seed=x.seed)
    updates = updates_per_iteration("grpo", s)
    return RLRun(module, x.prompts(s, s.prompts_per_step, "grpo", updates))
