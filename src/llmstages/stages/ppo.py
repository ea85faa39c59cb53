"""PPO for a causal LM (``rlhf.algorithm=ppo``): the policy and a value model, optimised against a sequence
reward (the reward model by default) with a per-token KL penalty to the frozen reference. The value model is a
separate critic initialised from the reward model (Ouyang et al. 2022, §3.5), or a scalar head on the policy.

Recipe: Ziegler et al. (2019), Ouyang et al. (2022) and Huang et al. (2024), "The N+ implementation details
of RLHF with PPO": the score is placed on the last generated token (EOS or truncation point), responses without
EOS are penalised, every token is charged ``-β KL_t`` with the chosen estimator (β fixed, or adapted towards
a target KL, Ziegler §2.2), advantages come from GAE and are whitened over valid tokens, and each rollout batch
is used for ``ppo_epochs`` passes of clipped policy and value updates in minibatches. Lightning's manual
optimization runs those updates inside ``training_step``; ``trainer.max_steps`` counts optimizer steps.
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from ..losses import (adaptive_kl_coef, gae, kl_estimate, masked_mean, normalise_scores, ppo_policy_loss,
                      token_entropy, value_loss, whiten)
from ..rollout import (PhaseTimer, RewardFn, RLInputs, RLRun, iteration_generator, minibatches, outside_inference,
                       penalised_rewards, response_hidden, response_logprobs, rollout_stats, sample)
from ..config import PPOSchema, updates_per_iteration
from ..lora import add_lora
from ..model import GPT, ScalarHead, freeze
from ..optim import adamw_with_schedule, manual_step, param_groups


class PPOModule(L.LightningModule):
    """One training step = one PPO iteration: rollout of ``len(batch)`` prompts, then
    ``ppo_epochs * len(batch) / minibatch_size`` optimizer steps."""

    def __init__(self, policy: GPT, reference: GPT, reward_fn: RewardFn, optim: dict, ppo: PPOSchema, grad_clip: float,
                 reward_modules: tuple[torch.nn.Module, ...] = (), *, eos_id: int, pad_id: int, seed: int = 0,
                 critic: GPT | None = None, critic_head: ScalarHead | None = None) -> None:
        super().__init__()
        # Value model: a separate critic (e.g. initialised from the reward model, as in Ouyang et al. 2022), or,
        # when ``critic`` is None, a scalar head on the policy's own hidden states.
        self.policy, self.critic = policy, critic
        self.value_head = critic_head if critic_head is not None else ScalarHead(policy.cfg.d_model)
        self.reference, self.reward_fn = reference, reward_fn
        self.reward_modules = torch.nn.ModuleList(reward_modules)  # used by reward_fn; moved to the device
        freeze(reference, *reward_modules)
        self.optim, self.c, self.grad_clip = optim, ppo, grad_clip
        self.register_buffer("kl_coef", torch.tensor(float(ppo.kl_coef)))  # adapted in place; checkpointed
        self.eos_id, self.pad_id = eos_id, pad_id  # generation stops at EOS; finished rows are filled with PAD
        self.seed = seed  # each iteration draws from iteration_generator(seed, step): resumable with no RNG state
        self.timer = PhaseTimer()
        self.automatic_optimization = False

    def logprobs_and_values(self, r):
        """Response log-probabilities under the policy and values ``(B, N)``, and the policy's logits."""
        if self.critic is None:
            return response_logprobs(self.policy, r, self.value_head)
        logp, logits = response_logprobs(self.policy, r)
        return logp, logits, self.value_head(response_hidden(self.critic, r)).float()

    @torch.no_grad()
    def rollout(self, batch: list[dict], generator: torch.Generator | None = None) -> dict:
        """Sample (from ``generator``), score and compute per-token rewards, advantages and returns ``(B, N)``."""
        c = self.c
        with self.timer("generation"):
            r = sample(self.policy, [b["prompt_ids"] for b in batch], c.max_new_tokens, self.eos_id, self.pad_id,
                       c.temperature, c.top_k, c.top_p, generator)
        with self.timer("scoring"), torch.inference_mode():
            logp, logits, values = self.logprobs_and_values(r)
            ref_logp, _ = response_logprobs(self.reference, r)
            score = penalised_rewards(self.reward_fn, r, batch, c.missing_eos_penalty)
            shaped = normalise_scores(score) if c.reward_norm else score
            if c.reward_clip:
                shaped = shaped.clamp(-c.reward_clip, c.reward_clip)
            kl = kl_estimate(logp, ref_logp, c.kl_estimator) * r.mask
            rewards = -self.kl_coef * kl
            last = (r.mask.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += shaped
            adv, returns = gae(rewards, values * r.mask, r.mask, c.gamma, c.lam)
            if c.whiten_advantages:
                adv = whiten(adv, r.mask)
            entropy = masked_mean(token_entropy(logits), r.mask)
        return dict(r=r, **outside_inference(dict(logp=logp, values=values, adv=adv, returns=returns, score=score,
                                                  kl=kl.sum(1), entropy=entropy)))

    def training_step(self, batch, batch_idx):
        c = self.c
        g = iteration_generator(self.device, self.seed, self.global_step, self.global_rank)
        ro = self.rollout(batch, g)
        r, B, stats = ro["r"], len(batch), []
        with self.timer("optimisation"):
            for _ in range(c.ppo_epochs):
                for idx in minibatches(B, c.minibatch_size, g):
                    mb = r.rows(idx)
                    logp, _, values = self.logprobs_and_values(mb)
                    pg_loss, clipfrac = ppo_policy_loss(logp, ro["logp"][idx], ro["adv"][idx], mb.mask, c.clip_range)
                    vf_loss = value_loss(values, ro["values"][idx], ro["returns"][idx], mb.mask, c.value_clip_range)
                    manual_step(self, pg_loss + c.vf_coef * vf_loss, self.grad_clip)
                    approx_kl = masked_mean(kl_estimate(ro["logp"][idx], logp.detach(), "k3"), mb.mask)
                    stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), clipfrac, approx_kl]))
        kl = ro["kl"].mean()
        if c.kl_target:
            self.kl_coef.fill_(adaptive_kl_coef(float(self.kl_coef), float(kl), c.kl_target, c.kl_horizon, B))
        pg, vf, cf, akl = torch.stack(stats).mean(0)
        self.log_dict({"train/reward": ro["score"].mean(), "train/kl": kl, "train/kl_coef": self.kl_coef,
                       "train/policy_loss": pg, "train/value_loss": vf, "train/clipfrac": cf,
                       "train/approx_kl_old_new": akl, "train/entropy": ro["entropy"],
                       **rollout_stats(r, self.timer)}, batch_size=B)
        self.log("reward", ro["score"].mean(), prog_bar=True, logger=False, batch_size=B)

    def configure_optimizers(self):
        groups = param_groups(self.policy, self.optim["weight_decay"]) + [{"params": self.value_head.parameters(),
                                                                           "weight_decay": 0.0}]
        if self.critic is not None:
            groups += param_groups(self.critic, self.optim["weight_decay"])
        return adamw_with_schedule(groups, **self.optim)


def build(s: PPOSchema, x: RLInputs) -> RLRun:
    """PPO on batches of ``s.rollout_batch_size`` training prompts; the value model is a critic initialised from
    the reward model (``value_model=reward_model``), or a head on the policy, then saved with it."""
    critic = {}
    if s.value_model == "reward_model":
        critic = dict(critic=copy.deepcopy(x.reward_model).requires_grad_(True).train(),
                      critic_head=copy.deepcopy(x.reward_head).requires_grad_(True).train())
        if x.lora:  # with LoRA, the critic trains adapters (and its head) too
            add_lora(critic["critic"], **x.lora)
    module = PPOModule(x.policy, x.reference, x.reward(s), x.optim, s, x.grad_clip, x.reward_modules(s),
                       eos_id=x.tok.eos_id, pad_id=x.tok.pad_id, seed=x.seed, **critic)
    updates = updates_per_iteration("ppo", s)
    return RLRun(module, x.prompts(s, s.rollout_batch_size, "ppo", updates),
                 saved_head=module.value_head if module.critic is None else None)
