"""DPO (``rlhf.algorithm=dpo``): Direct Preference Optimization, Rafailov et al. (2023), eq. 7.

The loss is ``-log σ(β [(log π - log π_ref)(chosen) - (log π - log π_ref)(rejected)])`` over summed response
log-probabilities (float32 log-softmax), the reference being the frozen SFT model. With ``sft_coef > 0`` the
chosen responses' next-token loss per token is added (RPO, Pang et al. 2024, eq. 2), which keeps DPO from
lowering the likelihood of the chosen answers along with the rejected ones.

Where the pairs come from (``rlhf.dpo.pairs``):

- ``offline``: the fixed preference pairs of the data stage (:class:`DPOModule`); no reward model, no sampling.
- ``online``: pairs sampled from the policy as it trains (:class:`OnlineDPOModule`): ``samples_per_prompt``
  responses per prompt, ranked by the sequence reward (the reward model, or exact match where the answer can be
  checked); the best is chosen and the worst rejected (:func:`~llmstages.losses.best_worst_pairs`), and groups
  whose samples all score the same are skipped. Online DPO with a reward model as the annotator: Guo et al.
  (2024, "Direct Language Model Alignment from Online AI Feedback"), Xiong et al. (2024, iterative DPO).

Both log the implicit rewards ``β (log π - log π_ref)``, their margin and the preference accuracy, on training
pairs and on the held-out preference pairs.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch

from ..evaluation import pair_logprobs
from ..losses import best_worst_pairs, dpo_loss
from ..model import GPT, param_groups
from ..rollout import (PhaseTimer, RewardFn, outside_inference, penalised_rewards, response_logprobs, rollout_stats,
                       sample)
from .common import adamw_with_schedule, freeze, manual_step


def rpo_dpo_loss(pi_c, pi_r, ref_c, ref_r, chosen_mask, c: dict,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO loss of summed response log-probabilities ``(B,)``, plus ``sft_coef`` times the chosen responses'
    NLL per token (``chosen_mask`` ``(B, N)``: their tokens), and the implicit-reward statistics to log. Pairs of
    ``weights`` 0 ``(B,)`` are left out of both terms and of the statistics."""
    w = torch.ones_like(pi_c) if weights is None else weights
    loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, c["beta"], c["label_smoothing"], w)
    if c["sft_coef"]:
        loss = loss - c["sft_coef"] * (pi_c * w).sum() / (chosen_mask * w[:, None]).sum().clamp(min=1)
    n = w.sum().clamp(min=1)
    stats = {"loss": loss.detach(), "reward_chosen": (rc * w).sum() / n, "reward_rejected": (rr * w).sum() / n,
             "reward_margin": ((rc - rr) * w).sum() / n, "accuracy": ((rc > rr).float() * w).sum() / n}
    return loss, stats


class DPOModule(L.LightningModule):
    """Offline DPO: one training step = one optimizer step on a batch of preference pairs."""

    def __init__(self, policy: GPT, reference: GPT, optim: dict, dpo: dict, grad_clip: float) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference
        freeze(reference)
        self.optim, self.c, self.grad_clip = optim, dpo, grad_clip
        self.timer = PhaseTimer()
        self.automatic_optimization = False

    def _loss(self, batch, prefix: str) -> torch.Tensor:
        timer = self.timer if prefix == "train" else (lambda phase: nullcontext())
        with timer("scoring"), torch.no_grad():
            ref_c, ref_r = pair_logprobs(self.reference, batch)
        with timer("optimisation"):
            pi_c, pi_r = pair_logprobs(self.policy, batch)
            loss, stats = rpo_dpo_loss(pi_c, pi_r, ref_c, ref_r, batch["loss_mask"][: len(pi_c), 1:], self.c)
        self.log_dict({f"{prefix}/{k}": v for k, v in stats.items()}, batch_size=len(pi_c), sync_dist=prefix == "val")
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, "train")
        with self.timer("optimisation"):
            manual_step(self, loss, self.grad_clip)
        self.log_dict(self.timer.metrics())
        self.log("loss", loss.detach(), prog_bar=True, logger=False)

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def configure_optimizers(self):
        return adamw_with_schedule(param_groups(self.policy, self.optim["weight_decay"]), **self.optim)


class OnlineDPOModule(DPOModule):
    """Online DPO: one training step = sampling ``samples_per_prompt`` responses to each of ``len(batch)``
    prompts, pairing each group's best and worst, then ``epochs`` passes over the pairs in minibatches of
    ``minibatch_size`` pairs (one optimizer step each; pairs without a preference weigh nothing)."""

    def __init__(self, policy: GPT, reference: GPT, reward_fn: RewardFn, optim: dict, dpo: dict, grad_clip: float,
                 reward_modules: tuple[torch.nn.Module, ...] = (), *, eos_id: int, pad_id: int) -> None:
        super().__init__(policy, reference, optim, dpo, grad_clip)
        self.reward_fn = reward_fn
        self.reward_modules = torch.nn.ModuleList(reward_modules)  # used by reward_fn; moved to the device
        freeze(*reward_modules)
        self.eos_id, self.pad_id = eos_id, pad_id

    @torch.no_grad()
    def rollout(self, batch: list[dict]) -> dict:
        """Sampled groups, their scores ``(P*G,)``, and per pair ``(P,)``: the chosen and rejected row indices,
        whether the pair expresses a preference, and the reference's summed log-probabilities of both."""
        c, G = self.c, self.c["samples_per_prompt"]
        with self.timer("generation"):
            r = sample(self.policy, [b["prompt_ids"] for b in batch for _ in range(G)], c["max_new_tokens"],
                       self.eos_id, self.pad_id, c["temperature"], c["top_k"], c["top_p"])
        with self.timer("scoring"), torch.inference_mode():
            score = penalised_rewards(self.reward_fn, r, [b for b in batch for _ in range(G)], c["missing_eos_penalty"])
            chosen, rejected, valid = best_worst_pairs(score, G)
            ref_logp, _ = response_logprobs(self.reference, r)
            ref_seq = (ref_logp * r.mask).sum(1)
            scored = dict(score=score, chosen=chosen, rejected=rejected, valid=valid.float(), ref_c=ref_seq[chosen],
                          ref_r=ref_seq[rejected], gap=score[chosen] - score[rejected])
        return dict(r=r, **outside_inference(scored))

    def training_step(self, batch, batch_idx):
        c, ro = self.c, self.rollout(batch)
        r, stats = ro["r"], []
        n_pairs = len(ro["chosen"])
        with self.timer("optimisation"):
            for _ in range(c["epochs"]):
                for idx in torch.randperm(n_pairs).split(c["minibatch_size"]):
                    mb = r.rows(torch.cat([ro["chosen"][idx], ro["rejected"][idx]]))
                    logp, _ = response_logprobs(self.policy, mb)
                    pi_c, pi_r = (logp * mb.mask).sum(1).chunk(2)
                    loss, s = rpo_dpo_loss(pi_c, pi_r, ro["ref_c"][idx], ro["ref_r"][idx], mb.mask[: len(idx)], c,
                                           weights=ro["valid"][idx])
                    manual_step(self, loss, self.grad_clip)
                    stats.append(s)
        mean = {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}
        self.log_dict({"train/reward": ro["score"].mean(), "train/preference_pairs": ro["valid"].mean(),
                       "train/score_gap": (ro["gap"] * ro["valid"]).sum() / ro["valid"].sum().clamp(min=1),
                       **{f"train/{k}": v for k, v in mean.items()}, **rollout_stats(r, self.timer)},
                      batch_size=r.tokens.shape[0])
        self.log("reward", ro["score"].mean(), prog_bar=True, logger=False, batch_size=r.tokens.shape[0])
