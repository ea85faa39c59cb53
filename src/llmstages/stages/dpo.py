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

import time
from contextlib import nullcontext
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..config import DPOSchema, updates_per_iteration
from ..data.datasets import PreferenceDataset, collate_pairs, heldout_loader
from ..data.formats import read_canonical
from ..evaluation import pair_logprobs
from ..losses import best_worst_pairs, dpo_loss
from ..rollout import (PhaseTimer, RewardFn, RLInputs, RLRun, iteration_generator, minibatches, outside_inference,
                       penalised_rewards, response_logprobs, rollout_stats, sample)
from ..model import GPT, freeze
from ..optim import adamw_with_schedule, manual_step, param_groups
from .stage import log_encoding


def rpo_dpo_loss(pi_c, pi_r, ref_c, ref_r, chosen_mask, c: DPOSchema,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO loss of summed response log-probabilities ``(B,)``, plus ``sft_coef`` times the chosen responses'
    NLL per token (``chosen_mask`` ``(B, N)``: their tokens), and the implicit-reward statistics to log. Pairs of
    ``weights`` 0 ``(B,)`` are left out of both terms and of the statistics."""
    w = torch.ones_like(pi_c) if weights is None else weights
    loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, c.beta, c.label_smoothing, w)
    if c.sft_coef:
        loss = loss - c.sft_coef * (pi_c * w).sum() / (chosen_mask * w[:, None]).sum().clamp(min=1)
    n = w.sum().clamp(min=1)
    stats = {"dpo_loss": loss.detach(), "reward_chosen": (rc * w).sum() / n, "reward_rejected": (rr * w).sum() / n,
             "reward_margin": ((rc - rr) * w).sum() / n, "reward_accuracy": ((rc > rr).float() * w).sum() / n}
    return loss, stats


class DPOModule(L.LightningModule):
    """Offline DPO: one training step = one optimizer step on a batch of preference pairs (Lightning's automatic
    optimization: the Trainer steps, clips and schedules)."""

    def __init__(self, policy: GPT, reference: GPT, optim: dict, dpo: DPOSchema) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference
        freeze(reference)
        self.optim, self.c = optim, dpo
        self.timer = PhaseTimer()
        self._update_start = 0.0

    def _loss(self, batch, prefix: str) -> torch.Tensor:
        timer = self.timer if prefix == "train" else (lambda phase: nullcontext())
        with timer("scoring"), torch.no_grad():
            ref_c, ref_r = pair_logprobs(self.reference, batch)
        self._update_start = time.perf_counter()  # optimisation: from here to the end of the optimizer step
        pi_c, pi_r = pair_logprobs(self.policy, batch)
        loss, stats = rpo_dpo_loss(pi_c, pi_r, ref_c, ref_r, batch["loss_mask"][: len(pi_c), 1:], self.c)
        self.log_dict({f"{prefix}/{k}": v for k, v in stats.items()}, batch_size=len(pi_c), sync_dist=prefix == "val")
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, "train")
        self.log_dict(self.timer.metrics())
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.automatic_optimization:  # backward and optimizer step ran after training_step
            self.timer.seconds["optimisation"] += time.perf_counter() - self._update_start

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def configure_optimizers(self):
        return adamw_with_schedule(param_groups(self.policy, self.optim["weight_decay"]), **self.optim)


class OnlineDPOModule(DPOModule):
    """Online DPO: one training step = sampling ``samples_per_prompt`` responses to each of ``len(batch)``
    prompts, pairing each group's best and worst, then ``epochs`` passes over the pairs in minibatches of
    ``minibatch_size`` pairs (one optimizer step each; pairs without a preference weigh nothing)."""

    def __init__(self, policy: GPT, reference: GPT, reward_fn: RewardFn, optim: dict, dpo: DPOSchema, grad_clip: float,
                 reward_modules: tuple[torch.nn.Module, ...] = (), *, eos_id: int, pad_id: int, seed: int = 0) -> None:
        super().__init__(policy, reference, optim, dpo)
        self.seed = seed  # each iteration draws from iteration_generator(seed, step): resumable with no RNG state
        self.automatic_optimization = False  # several optimizer steps per iteration
        self.grad_clip, self.reward_fn = grad_clip, reward_fn
        self.reward_modules = torch.nn.ModuleList(reward_modules)  # used by reward_fn; moved to the device
        freeze(*reward_modules)
        self.eos_id, self.pad_id = eos_id, pad_id

    @torch.no_grad()
    def rollout(self, batch: list[dict], generator: torch.Generator | None = None) -> dict:
        """Sampled groups (drawn from ``generator``), their scores ``(P*G,)``, and per pair ``(P,)``: the chosen and rejected row indices,
        whether the pair expresses a preference, and the reference's summed log-probabilities of both."""
        c, G = self.c, self.c.samples_per_prompt
        with self.timer("generation"):
            r = sample(self.policy, [b["prompt_ids"] for b in batch for _ in range(G)], c.max_new_tokens,
                       self.eos_id, self.pad_id, c.temperature, c.top_k, c.top_p, generator)
        with self.timer("scoring"), torch.inference_mode():
            score = penalised_rewards(self.reward_fn, r, [b for b in batch for _ in range(G)], c.missing_eos_penalty)
            chosen, rejected, valid = best_worst_pairs(score, G)
            ref_logp, _ = response_logprobs(self.reference, r)
            ref_seq = (ref_logp * r.mask).sum(1)
            scored = dict(score=score, chosen=chosen, rejected=rejected, valid=valid.float(), ref_c=ref_seq[chosen],
                          ref_r=ref_seq[rejected], gap=score[chosen] - score[rejected])
        return dict(r=r, **outside_inference(scored))

    def training_step(self, batch, batch_idx):
        c = self.c
        g = iteration_generator(self.device, self.seed, self.global_step, self.global_rank)
        ro = self.rollout(batch, g)
        r, stats = ro["r"], []
        n_pairs = len(ro["chosen"])
        with self.timer("optimisation"):
            for _ in range(c.epochs):
                for idx in minibatches(n_pairs, c.minibatch_size, g):
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


def build(s: DPOSchema, x: RLInputs) -> RLRun:
    """Offline DPO on the data stage's preference pairs, or online DPO on pairs of the policy's own samples
    (``s.pairs``); both report the implicit-reward accuracy and margin on the held-out pairs at the end."""
    kw = dict(batch_size=s.batch_size, collate_fn=partial(collate_pairs, pad_id=x.tok.pad_id),
              num_workers=x.num_workers)
    pairs = {}
    for split in ("train", "val") if s.pairs == "offline" else ("val",):
        path = x.data_dir / f"pref_{split}.jsonl"
        pairs[split] = PreferenceDataset(read_canonical(path, "preference"), x.tok, s.max_len, s.long_prompt, str(path))
    log_encoding("dpo", **{k: d.stats for k, d in pairs.items()})
    if s.pairs == "offline":
        module = DPOModule(x.policy, x.reference, x.optim, s)
        train = x.loader(pairs["train"], pairs["train"].tasks, s.batch_size, x.max_steps * x.micro_batches,
                         collate_fn=kw["collate_fn"], num_workers=x.num_workers)
    else:
        module = OnlineDPOModule(x.policy, x.reference, x.reward(s), x.optim, s, x.grad_clip, x.reward_modules(s),
                                 eos_id=x.tok.eos_id, pad_id=x.tok.pad_id, seed=x.seed)
        train = x.prompts(s, s.prompts_per_step, "dpo", updates_per_iteration("dpo", s))
    val = heldout_loader(pairs["val"], **kw)  # during training: a sample of every task

    def final_metrics(trainer) -> dict:  # over all held-out pairs, not the limit_val_batches of training
        trainer.limit_val_batches = 1.0
        m = trainer.validate(module, DataLoader(pairs["val"], **kw), verbose=False)[0]
        return {"dpo_val_accuracy": m["val/reward_accuracy"], "dpo_val_reward_margin": m["val/reward_margin"]}

    return RLRun(module, train, val, final_metrics=final_metrics)
