"""Losses and RL quantities as pure functions, each checked against hand-computed values in tests.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary size. Log-probabilities and losses are in
nats and computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (0.0 when the mask is empty, never NaN)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy in nats per supervised token.

    Args:
        logits: ``(B, T, V)`` predictions for the token at each position's *next* index, already aligned
            with ``targets`` (i.e. ``logits[:, t]`` predicts ``targets[:, t]``).
        targets: ``(B, T)`` token ids.
        loss_mask: ``(B, T)`` 1 where the target is supervised (e.g. response tokens in SFT); ``None`` = all.

    Raises:
        ValueError: if ``loss_mask`` has no supervised position (a batch must never give a fake 0.0 loss).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    if loss_mask is None:
        return ce.mean()
    if not bool(loss_mask.any()):
        raise ValueError("loss_mask has no supervised token in this batch")
    return masked_mean(ce, loss_mask)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability ``(B, T)`` of each target id under ``logits`` ``(B, T, V)``; log-softmax in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats ``(B, T)`` of the categorical distribution at each position of ``logits`` ``(B, T, V)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss ``-log sigmoid(r_chosen - r_rejected)``, mean over pairs ``(B,)``.

    Bradley & Terry (1952); as used for RLHF reward models in Ouyang et al. (2022), eq. 1.
    """
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate ``(B, T)`` of KL(policy || reference) from samples of the policy.

    With ``log_ratio = logp - ref_logp`` (Schulman 2020, "Approximating KL divergence"):
    ``k1 = log_ratio`` (unbiased, can be negative); ``k2 = log_ratio**2 / 2``;
    ``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased, never negative).

    Raises:
        ValueError: for an unknown estimator name.
    """
    log_ratio = logp.float() - ref_logp.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3")


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` ``(B, T)`` to zero mean, unit variance over masked positions (masked-out left as 0).

    With fewer than two valid positions the variance is undefined: ``x`` is returned centred (or as is
    when ``shift_mean`` is False), never NaN.
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    if n < 2:
        out = x - mean if shift_mean else x
        return out * mask
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` taken as 0 after the last valid token of each row.

    Args:
        rewards, values, mask: ``(B, T)``; ``mask`` is 1 on valid (generated) tokens, a prefix of each row.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, zero where ``mask`` is 0; ``returns = advantages + values``.
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with ``ratio = exp(logp - old_logp)``.
    All inputs ``(B, T)``; returns ``(loss, clip_fraction)`` averaged over ``mask``.
    """
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None = 0.2) -> torch.Tensor:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old ± eps) - R)^2)`` (Huang et al. 2024, detail 9).

    All inputs ``(B, T)``; ``clip_range=None`` gives the plain squared error.
    """
    values = values.float()
    err = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)
