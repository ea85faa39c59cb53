"""The optimizer and learning-rate schedule of every training stage: AdamW over parameter groups, linear warmup
then cosine decay, and the optimizer step of the stages that use Lightning's manual optimization (the RL stages).
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
