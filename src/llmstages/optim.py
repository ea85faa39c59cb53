"""The optimizer and learning-rate schedule of every training stage: AdamW over parameter groups, linear warmup
then cosine decay; losses averaged over every token (or pair) of an optimizer step across gradient accumulation
and DDP (:class:`StepMean`); and the optimizer step of the stages that use Lightning's manual optimization (the
RL stages).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (dim >= 2), none on norms, biases and 1-D params."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_with_schedule(params, lr: float, weight_decay: float, betas, eps: float, warmup_steps: int,
                        max_steps: int, min_lr_ratio: float):
    """AdamW (multi-tensor ``foreach`` kernel) + linear warmup then cosine decay to ``min_lr_ratio * lr`` at
    ``max_steps``. Optimizer state is kept in the parameters' dtype (float32 under mixed precision).

    Not the fused kernel: Lightning refuses gradient clipping with an optimizer that unscales gradients itself
    (fused AdamW) under mixed precision. ``params`` are parameter groups (see
    :func:`param_groups`). Returns Lightning's ``{"optimizer", "lr_scheduler"}`` dict with a
    per-step schedule.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, foreach=True)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

def optim_kwargs(cfg) -> dict:
    """Plain keyword arguments for :func:`adamw_with_schedule` from a stage config."""
    o = cfg.optim
    return dict(lr=o.lr, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps, warmup_steps=o.warmup_steps,
                max_steps=cfg.trainer.max_steps, min_lr_ratio=o.min_lr_ratio)

def manual_step(module, loss: torch.Tensor, grad_clip: float) -> None:
    """One optimizer and LR-scheduler step of a LightningModule under Lightning's manual optimization
    (gradient-norm clipping at ``grad_clip``; 0 turns it off)."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    opt.zero_grad()
    module.manual_backward(loss)
    if grad_clip:
        module.clip_gradients(opt, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
    opt.step()
    sched.step()


class StepMean:
    """A loss that is a mean over items (supervised tokens, preference pairs), taken over the whole optimizer
    step: every item of the step's micro-batches (``trainer.accumulate_grad_batches`` of them) on every DDP
    process weighs the same, so accumulation and DDP are exact rewrites of one large batch.

    Averaging each micro-batch's mean instead (what Lightning's accumulation and DDP's gradient averaging do)
    weighs a micro-batch of 2 supervised tokens as much as one of 8: the "gradient accumulation bug" that
    Hugging Face transformers fixed in 2024 by dividing by the step's item count (``num_items_in_batch``).

    Use, in a LightningModule with automatic optimization: ``return self.step_mean.add(self, losses)`` from
    ``training_step`` with the per-item losses ``(N,)`` of the micro-batch, and ``loss = self.step_mean.finish(self)``
    in ``on_before_optimizer_step`` (after the step's last backward, before gradient clipping), which divides
    the gradients by the step's item count and returns the step's mean loss (the value to log).

    With one micro-batch per step on one process the micro-batch mean is the step mean: :meth:`add` returns it
    and :meth:`finish` leaves the gradients alone (the same numbers as a plain mean).
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    @staticmethod
    def _scale(module) -> int:
        """``A * W``: what Lightning (``/A``, accumulation) and DDP (``/W``, gradient averaging) divide by."""
        return module.trainer.accumulate_grad_batches * module.trainer.world_size

    def add(self, module, losses: torch.Tensor) -> torch.Tensor:
        """Record a micro-batch's per-item losses ``(N,)``; return the loss to backpropagate (scalar).

        Raises:
            ValueError: if ``losses`` is empty (a micro-batch must never give a fake 0.0 loss).
        """
        if losses.numel() == 0:
            raise ValueError("a micro-batch with no supervised token or pair")
        self._sum = self._sum + losses.detach().float().sum()
        self._count += losses.numel()
        scale = self._scale(module)
        return losses.mean() if scale == 1 else losses.sum() * scale

    def finish(self, module) -> torch.Tensor:
        """Divide the accumulated gradients by the item count of the whole step (all micro-batches, all
        processes); return the step's mean loss over those items (scalar, the same on every process)."""
        total = torch.stack([torch.as_tensor(self._sum, dtype=torch.float32, device=module.device),
                             torch.tensor(float(self._count), device=module.device)])
        self._sum, self._count = 0.0, 0
        if self._scale(module) == 1:
            return total[0] / total[1]
        total = module.trainer.strategy.reduce(total, reduce_op="sum")
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(total[1])
        return total[0] / total[1]
