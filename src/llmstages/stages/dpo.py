"""DPO (``rlhf.algorithm=dpo``): Direct Preference Optimization, Rafailov et al. (2023), eq. 7.

Trains the policy directly on the preference pairs, with no reward model and no sampling: the loss is
``-log σ(β [(log π - log π_ref)(chosen) - (log π - log π_ref)(rejected)])`` over summed response
log-probabilities (float32 log-softmax), the reference being the frozen SFT model. With ``sft_coef > 0`` the
chosen responses' next-token loss is added (RPO, Pang et al. 2024), which keeps DPO from lowering the
likelihood of the chosen answers along with the rejected ones. Logs the implicit rewards
``β (log π - log π_ref)``, their margin and the preference accuracy, on training and held-out pairs.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch

from ..evaluation import pair_logprobs
from ..losses import dpo_loss
from ..model import GPT, param_groups
from ..rollout import PhaseTimer
from .common import adamw_with_schedule, freeze, manual_step


class DPOModule(L.LightningModule):
    """One training step = one optimizer step on a batch of preference pairs."""

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
            loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.c["beta"], self.c["label_smoothing"])
            if self.c["sft_coef"]:  # RPO (Pang et al. 2024, eq. 2): plus the chosen responses' NLL per token
                n_chosen = batch["loss_mask"][: len(pi_c), 1:].sum().clamp(min=1)
                loss = loss - self.c["sft_coef"] * pi_c.sum() / n_chosen
        n = len(rc)
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/reward_chosen": rc.mean(), f"{prefix}/reward_rejected": rr.mean(),
                       f"{prefix}/reward_margin": (rc - rr).mean(), f"{prefix}/accuracy": (rc > rr).float().mean()},
                      batch_size=n, sync_dist=prefix == "val")
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
