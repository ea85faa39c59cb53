"""Tests for the preference/RL losses in llmstages.losses (sequence_logprobs, dpo_loss, best_worst_pairs,
group_advantages, grpo_loss, adaptive_kl_coef, normalise_scores) and for generate() dropping finished rows mid-generation.

Every expected value is computed by hand (arithmetic in the comments, math.* in the code), never by the
function under test.
"""

import math

import pytest
import torch

from llmstages.generation import generate
from llmstages.losses import (
    adaptive_kl_coef, best_worst_pairs, dpo_loss, group_advantages, grpo_loss, normalise_scores, sequence_logprobs,
)
from llmstages.model import GPT, GPTConfig


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-6):
    return actual.float().tolist() == pytest.approx(expected, abs=tol)


def log1pexp(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- sequence_logprobs

# logits (3, 3, 2), targets (3, 3); log p(target) = logit[target] - logsumexp(logits)
SEQ_LOGITS = [
    [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
    [[0.0, 0.0], [1.0, 3.0], [5.0, 5.0]],
    [[4.0, 0.0], [0.0, 4.0], [2.0, 2.0]],
]
SEQ_TARGETS = [[0, 0, 1], [1, 1, 0], [0, 1, 0]]
SEQ_MASK = [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
# row 0: token 0: 2 - log(e^2 + 1) = -log(1 + e^-2); token 1 masked; token 2: 1 - log(2e) = -log 2
# row 1: token 0: -log 2; token 1: 3 - log(e + e^3) = -log(1 + e^-2); token 2 masked
# row 2: nothing supervised -> 0
SEQ_EXPECTED = [-(math.log1p(math.exp(-2.0)) + math.log(2.0)),
                -(math.log(2.0) + math.log1p(math.exp(-2.0))),
                0.0]


def test_sequence_logprobs_hand_values():
    out = sequence_logprobs(t(SEQ_LOGITS), t(SEQ_TARGETS, torch.long), t(SEQ_MASK, torch.long))
    assert out.shape == (3,)
    assert out.dtype == torch.float32
    assert close(out, SEQ_EXPECTED)
    assert SEQ_EXPECTED[0] == pytest.approx(-(0.1269280 + 0.6931472), abs=1e-6)  # ~ -0.820075
    # a bool mask gives the same sums
    bool_out = sequence_logprobs(t(SEQ_LOGITS), t(SEQ_TARGETS, torch.long), t(SEQ_MASK, torch.bool))
    assert close(bool_out, SEQ_EXPECTED)


def test_sequence_logprobs_masked_positions_ignored():
    # changing logits and targets where the mask is 0 must not change the sums
    logits = t(SEQ_LOGITS)
    targets = t(SEQ_TARGETS, torch.long)
    logits[0, 1] = t([-30.0, 30.0])  # masked position of row 0: log p(target 0) ~ -60
    logits[2] = 100.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    targets[1, 2] = 1
    out = sequence_logprobs(logits, targets, t(SEQ_MASK, torch.long))
    assert close(out, SEQ_EXPECTED)


def test_sequence_logprobs_bf16_gives_float32_close_to_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    targets = torch.randint(0, 7, (2, 5))
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], torch.long)
    ref = sequence_logprobs(logits, targets, mask)
    low_logits = logits.to(torch.bfloat16)
    low = sequence_logprobs(low_logits, targets, mask)
    assert low.dtype == torch.float32
    # only the bf16 rounding of the logits (rel. 2^-8, |logits| <~ 10) separates the two: <~ 0.04 per token
    torch.testing.assert_close(low, ref, atol=0.2, rtol=0)
    # the log-softmax itself runs in float32: identical to float32 on the bf16-rounded logits
    torch.testing.assert_close(low, sequence_logprobs(low_logits.float(), targets, mask), atol=1e-5, rtol=0)
    # hand example: all SEQ_LOGITS values are exact in bf16
    hand = sequence_logprobs(t(SEQ_LOGITS, torch.bfloat16), t(SEQ_TARGETS, torch.long), t(SEQ_MASK, torch.long))
    assert hand.dtype == torch.float32
    assert close(hand, SEQ_EXPECTED, tol=1e-5)


# ---------------------------------------------------------------- dpo_loss

# pi_c = -1, pi_r = -3, ref_c = -2, ref_r = -2, beta = 0.1:
#   chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1
#   h = 0.1 * (1 - (-1)) = 0.2; loss = -log sigmoid(0.2) = log(1 + e^-0.2) ~ 0.598139
DPO_H = 0.2
DPO_LOSS = log1pexp(-DPO_H)


def test_dpo_loss_single_pair_hand_value():
    loss, r_c, r_r = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(DPO_LOSS, abs=1e-6)
    assert DPO_LOSS == pytest.approx(0.5981389, abs=1e-6)
    # implicit rewards beta * (log pi - log pi_ref): 0.1 * 1 = 0.1 and 0.1 * -1 = -0.1
    assert close(r_c, [0.1])
    assert close(r_r, [-0.1])


def test_dpo_loss_beta_scales_margin():
    # same log-probs, beta = 0.5: h = 0.5 * 2 = 1; loss = log(1 + e^-1) ~ 0.313262; rewards +-0.5
    loss, r_c, r_r = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(log1pexp(-1.0), abs=1e-6)
    assert close(r_c, [0.5]) and close(r_r, [-0.5])


def test_dpo_loss_two_pair_batch_mean():
    # pair 0 as above: h0 = 0.2
    # pair 1: pi_c = -5, pi_r = -4, ref_c = -4, ref_r = -6:
    #   chosen log-ratio = -5 + 4 = -1, rejected = -4 + 6 = 2, h1 = 0.1 * (-1 - 2) = -0.3
    #   loss1 = -log sigmoid(-0.3) = log(1 + e^0.3) ~ 0.854355
    loss, r_c, r_r = dpo_loss(t([-1.0, -5.0]), t([-3.0, -4.0]), t([-2.0, -4.0]), t([-2.0, -6.0]), beta=0.1)
    expected = (log1pexp(-0.2) + log1pexp(0.3)) / 2  # ~ (0.598139 + 0.854355) / 2 = 0.726247
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.7262470, abs=1e-6)
    assert close(r_c, [0.1, -0.1])  # 0.1 * [1, -1]
    assert close(r_r, [-0.1, 0.2])  # 0.1 * [-1, 2]


def test_dpo_loss_policy_equal_to_reference_is_log2():
    # h = 0 -> -log sigmoid(0) = log 2, whatever the log-probs; rewards 0
    pc, pr = t([-1.0, -7.5, -0.25]), t([-3.0, -2.0, -9.0])
    loss, r_c, r_r = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert close(r_c, [0.0, 0.0, 0.0]) and close(r_r, [0.0, 0.0, 0.0])
    # label smoothing doesn't change it: (1 - eps) log 2 + eps log 2 = log 2
    loss_ls, _, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=0.3)
    assert loss_ls.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_dpo_loss_label_smoothing_cdpo():
    # cDPO, eps = 0.1, h = 0.2: -(0.9) log sigmoid(0.2) - 0.1 log sigmoid(-0.2)
    #   = 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139
    eps = 0.1
    loss, r_c, r_r = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, label_smoothing=eps)
    expected = (1 - eps) * log1pexp(-DPO_H) + eps * log1pexp(DPO_H)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.6181389, abs=1e-6)  # log(1+e^x) - log(1+e^-x) = x: 0.598139 + 0.1*0.2
    assert close(r_c, [0.1]) and close(r_r, [-0.1])  # rewards do not depend on smoothing
    # eps = 0.5 makes the loss symmetric in h: 0.5 * (log(1+e^-0.2) + log(1+e^0.2))
    half, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, label_smoothing=0.5)
    assert half.item() == pytest.approx(0.5 * (log1pexp(-0.2) + log1pexp(0.2)), abs=1e-6)


def test_dpo_loss_gradient_and_detached_rewards():
    # d/d pi_c [-log sigmoid(beta (pi_c - ref_c - pi_r + ref_r))] = -beta * sigmoid(-h) = -0.1 / (1 + e^0.2)
    pc = t([-1.0]).requires_grad_()
    pr = t([-3.0]).requires_grad_()
    loss, r_c, r_r = dpo_loss(pc, pr, t([-2.0]), t([-2.0]), beta=0.1)
    loss.backward()
    g = 0.1 / (1.0 + math.exp(0.2))  # ~ 0.0450166
    assert pc.grad.item() == pytest.approx(-g, abs=1e-7)
    assert pr.grad.item() == pytest.approx(g, abs=1e-7)
    assert not r_c.requires_grad and not r_r.requires_grad


def test_dpo_loss_float32_for_bf16_inputs():
    # -1, -3, -2 are exact in bf16
    bf = torch.bfloat16
    loss, r_c, _ = dpo_loss(t([-1.0], bf), t([-3.0], bf), t([-2.0], bf), t([-2.0], bf), beta=0.1)
    assert loss.dtype == torch.float32 and r_c.dtype == torch.float32
    assert loss.item() == pytest.approx(DPO_LOSS, abs=1e-6)


# ---------------------------------------------------------------- group_advantages

SQRT3_2 = math.sqrt(3.0) / 2.0  # 0.5 / sqrt(1/3) = 0.8660254


def test_dpo_loss_weights_leave_pairs_out():
    # pair 1 is the single pair above (loss log(1 + e^-0.2)); pair 2 (h = 0.1 * (-4 - 2) = -0.6) has weight 0:
    # the loss is pair 1's alone, sum(w * loss) / sum(w) = DPO_LOSS / 1
    pc, pr = t([-1.0, -5.0]).requires_grad_(), t([-3.0, -1.0])
    loss, _, _ = dpo_loss(pc, pr, t([-2.0, -2.0]), t([-2.0, -2.0]), beta=0.1, weights=t([1.0, 0.0]))
    assert loss.item() == pytest.approx(DPO_LOSS, abs=1e-6)
    loss.backward()
    assert pc.grad[1].item() == 0.0 and pc.grad[0].item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.2))))
    # no pair with a preference: loss 0 (divided by max(sum w, 1)), no gradient
    none, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, weights=t([0.0]))
    assert none.item() == 0.0


# ---------------------------------------------------------------- best_worst_pairs

def test_best_worst_pairs_hand_values():
    # groups of 4: [1, 3, 2, 0] -> best index 1, worst 3; [5, 5, 5, 5] -> all equal: no preference (first, first);
    # [-1, 2, 2, -1] -> ties broken by the first: best 8 + 1 = 9, worst 8 + 0 = 8
    chosen, rejected, valid = best_worst_pairs(t([1, 3, 2, 0, 5, 5, 5, 5, -1, 2, 2, -1]), 4)
    assert chosen.tolist() == [1, 4, 9] and rejected.tolist() == [3, 4, 8] and valid.tolist() == [True, False, True]


@pytest.mark.parametrize("n,group", [(6, 4), (4, 1)])
def test_best_worst_pairs_bad_groups_raise(n, group):
    with pytest.raises(ValueError, match=f"groups of {group}"):
        best_worst_pairs(torch.zeros(n), group)


def test_group_advantages_one_group_hand_values():
    # [1, 0, 0, 1]: mean 0.5, deviations +-0.5, sample variance 4 * 0.25 / 3 = 1/3, std = 0.577350
    #   A = +-0.5 / 0.577350 = +-0.866025 (eps = 1e-6 is negligible at this tolerance)
    adv = group_advantages(t([1.0, 0.0, 0.0, 1.0]), 4)
    assert adv.shape == (4,)
    assert adv.dtype == torch.float32
    assert close(adv, [SQRT3_2, -SQRT3_2, -SQRT3_2, SQRT3_2], tol=1e-5)
    assert SQRT3_2 == pytest.approx(0.8660254, abs=1e-7)


def test_group_advantages_two_groups_independent():
    # group 0: [0, 1, 2]: mean 1, sample var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]
    # group 1: [10, 20, 60]: mean 30, deviations [-20, -10, 30], sample var (400 + 100 + 900) / 2 = 700,
    #   std = sqrt(700) = 26.457513 -> [-0.755929, -0.377964, 1.133893]
    s = math.sqrt(700.0)
    adv = group_advantages(t([0.0, 1.0, 2.0, 10.0, 20.0, 60.0]), 3)
    assert close(adv, [-1.0, 0.0, 1.0, -20 / s, -10 / s, 30 / s], tol=1e-5)
    assert [-20 / s, -10 / s, 30 / s] == pytest.approx([-0.7559289, -0.3779645, 1.1338934], abs=1e-6)
    # changing group 1 does not move group 0
    other = group_advantages(t([0.0, 1.0, 2.0, -5.0, 100.0, 3.0]), 3)
    assert close(other[:3], [-1.0, 0.0, 1.0], tol=1e-5)
    # same group as the first one, alone: same values (the normalisation is per group, not over the batch)
    assert close(group_advantages(t([10.0, 20.0, 60.0]), 3), [-20 / s, -10 / s, 30 / s], tol=1e-5)


def test_group_advantages_equal_rewards_zero_no_nan():
    adv = group_advantages(t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3)
    assert not torch.isnan(adv).any()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]  # (1 - 1) / (0 + eps) = 0 exactly
    # group 1: [0, 1, 0]: mean 1/3, deviations [-1/3, 2/3, -1/3], sample var (1/9 + 4/9 + 1/9) / 2 = 1/3
    #   std = 0.577350 -> [-0.577350, 1.154701, -0.577350]
    r3 = 1 / math.sqrt(3.0)
    assert close(adv[3:], [-r3, 2 * r3, -r3], tol=1e-5)
    zeros = group_advantages(t([0.0, 0.0, 0.0, 0.0]), 2)
    assert not torch.isnan(zeros).any() and zeros.tolist() == [0.0] * 4


def test_group_advantages_group_size_one_zero():
    adv = group_advantages(t([3.0, -1.0, 7.0]), 1)
    assert not torch.isnan(adv).any()
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_not_a_multiple_raises():
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0, 0.0, 1.0, 1.0]), 2)
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0, 0.0, 1.0]), 3)


# ---------------------------------------------------------------- grpo_loss

LOG = math.log


def test_grpo_loss_ratio_inside_clip_range():
    # one response of two tokens, A = 2, ratio = exp(logp - old) = 1.1 and 0.9 (inside [0.8, 1.2])
    #   per-token -A * r = -2.2 and -1.8; response mean -2.0; no clipping; ref = logp -> KL 0
    logp = t([[-1.0, -2.0]])
    old = logp - t([[LOG(1.1), LOG(0.9)]])
    loss, clipfrac, kl = grpo_loss(logp, old, logp.clone(), t([2.0]), t([[1, 1]], torch.long),
                                   clip_range=0.2, kl_coef=0.04)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(-2.0, abs=1e-5)
    assert clipfrac.item() == 0.0
    assert kl.item() == pytest.approx(0.0, abs=1e-7)


def test_grpo_loss_ratio_outside_clip_range():
    # four one-token responses, clip_range 0.2 (clip to [0.8, 1.2]), kl_coef 0 (ref = logp anyway):
    #   r = 1.5, A = +1: max(-1.5, -1.2) = -1.2  (clipped: the pessimistic term is the clipped one)
    #   r = 1.5, A = -1: max( 1.5,  1.2) =  1.5  (not clipped)
    #   r = 0.5, A = -1: max( 0.5,  0.8) =  0.8  (clipped)
    #   r = 0.5, A = +1: max(-0.5, -0.8) = -0.5  (not clipped)
    # loss = (-1.2 + 1.5 + 0.8 - 0.5) / 4 = 0.6 / 4 = 0.15; clipfrac = 2 / 4 = 0.5
    ratios = [1.5, 1.5, 0.5, 0.5]
    logp = t([[-1.0], [-2.0], [-1.5], [-0.5]])
    old = logp - t([[LOG(r)] for r in ratios])
    adv = t([1.0, -1.0, -1.0, 1.0])
    loss, clipfrac, kl = grpo_loss(logp, old, logp.clone(), adv, torch.ones(4, 1), clip_range=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(0.15, abs=1e-5)
    assert clipfrac.item() == pytest.approx(0.5, abs=1e-6)
    # only the first response: loss -1.2, clipfrac 1
    loss0, clipfrac0, _ = grpo_loss(logp[:1], old[:1], logp[:1].clone(), adv[:1], torch.ones(1, 1),
                                    clip_range=0.2, kl_coef=0.0)
    assert loss0.item() == pytest.approx(-1.2, abs=1e-5)
    assert clipfrac0.item() == 1.0


def test_grpo_loss_kl_term_k3():
    # A = 0 (no policy term), ratio 1, one response of two tokens, kl_coef 0.1
    #   token 0: logp -1, ref -2: d = ref - logp = -1, k3 = e^-1 - (-1) - 1 = e^-1      = 0.367879
    #   token 1: logp -2, ref -1: d = +1,              k3 = e^1  -   1  - 1 = e - 2     = 0.718282
    #   kl = mean = (0.367879 + 0.718282) / 2 = 0.543081; loss = 0.1 * 0.543081 = 0.0543081
    logp = t([[-1.0, -2.0]])
    ref = t([[-2.0, -1.0]])
    k3 = [math.exp(-1.0), math.e - 2.0]
    loss, clipfrac, kl = grpo_loss(logp, logp.clone(), ref, t([0.0]), t([[1, 1]], torch.long),
                                   clip_range=0.2, kl_coef=0.1)
    assert kl.item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert sum(k3) / 2 == pytest.approx(0.5430806, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-6)
    assert clipfrac.item() == 0.0
    # with a policy term too: A = 1, ratio 1.1 on both tokens: per token -1.1 + 0.1 * k3
    #   loss = -1.1 + 0.0543081 = -1.0456919
    loss2, _, kl2 = grpo_loss(logp, logp - LOG(1.1), ref, t([1.0]), t([[1, 1]], torch.long),
                              clip_range=0.2, kl_coef=0.1)
    assert loss2.item() == pytest.approx(-1.1 + 0.1 * sum(k3) / 2, abs=1e-5)
    assert kl2.item() == pytest.approx(sum(k3) / 2, abs=1e-6)  # kl depends on logp and ref only


def test_grpo_loss_per_response_mean_not_token_mean():
    # response 0: 1 real token, A = +1, ratio 1 -> per token -1
    # response 1: 3 real tokens, A = -1, ratio 1 -> per token +1 each
    #   per-response means: -1 and +1 -> loss = (-1 + 1) / 2 = 0
    #   (a token mean would give (-1 + 3 * 1) / 4 = 0.5)
    # padding of response 0 holds garbage log-probs that must be ignored
    logp = t([[-1.0, -50.0, 7.0], [-1.0, -2.0, -3.0]])
    old = t([[-1.0, 0.0, -9.0], [-1.0, -2.0, -3.0]])
    ref = t([[-1.0, 3.0, 30.0], [-1.0, -2.0, -3.0]])
    mask = t([[1, 0, 0], [1, 1, 1]], torch.long)
    loss, clipfrac, kl = grpo_loss(logp, old, ref, t([1.0, -1.0]), mask, clip_range=0.2, kl_coef=0.04)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() != pytest.approx(0.5, abs=0.1)
    assert clipfrac.item() == 0.0
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    # with KL: response 1's tokens get d = ref - logp = -1 (k3 = e^-1 each), response 0 none, kl_coef 0.5
    #   per-response means: -1 and 1 + 0.5 e^-1 -> loss = 0.25 e^-1 = 0.0919699
    #   kl (token mean over the 4 real tokens) = 3 e^-1 / 4 = 0.2759039
    ref2 = ref.clone()
    ref2[1] = logp[1] - 1.0
    loss2, _, kl2 = grpo_loss(logp, old, ref2, t([1.0, -1.0]), mask, clip_range=0.2, kl_coef=0.5)
    assert loss2.item() == pytest.approx(0.25 * math.exp(-1.0), abs=1e-6)
    assert kl2.item() == pytest.approx(0.75 * math.exp(-1.0), abs=1e-6)


def test_grpo_loss_kl_never_negative_and_detached():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, generator=g) * 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 6, generator=g)
    ref = torch.randn(4, 6, generator=g) * 2
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    loss, clipfrac, kl = grpo_loss(logp, old, ref, torch.randn(4, generator=g), mask)
    assert kl.item() >= 0.0
    assert not kl.requires_grad
    assert 0.0 <= clipfrac.item() <= 1.0
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[mask == 0].eq(0).all()  # padding gets no gradient
    for sign in (1.0, -1.0):  # policy above and below the reference everywhere
        _, _, kl_s = grpo_loss(ref + sign * 0.7, ref + sign * 0.7, ref, torch.zeros(4), mask)
        # k3 with d = -+0.7: e^-0.7 + 0.7 - 1 = 0.196585 or e^0.7 - 0.7 - 1 = 0.313753, both > 0
        expected = math.exp(-sign * 0.7) + sign * 0.7 - 1.0
        assert kl_s.item() == pytest.approx(expected, abs=1e-5) and kl_s.item() > 0


# ---------------------------------------------------------------- adaptive_kl_coef


def test_adaptive_kl_coef_above_target_clipped():
    # kl 10, target 5: error = 10/5 - 1 = 1 -> clipped to 0.2; coef 0.1 * (1 + 0.2 * 100/10000) = 0.1002
    assert adaptive_kl_coef(0.1, 10.0, 5.0, 10000, 100) == pytest.approx(0.1 * 1.002, abs=1e-12)
    # kl 6 is exactly at the clip: 6/5 - 1 = 0.2 -> 0.1 * (1 + 0.2 * 0.01) = 0.1002
    assert adaptive_kl_coef(0.1, 6.0, 5.0, 10000, 100) == pytest.approx(0.1002, abs=1e-12)


def test_adaptive_kl_coef_below_target_clipped():
    # kl 1, target 5: 1/5 - 1 = -0.8 -> clipped to -0.2; 0.1 * (1 - 0.2 * 0.01) = 0.0998
    assert adaptive_kl_coef(0.1, 1.0, 5.0, 10000, 100) == pytest.approx(0.0998, abs=1e-12)
    # kl 0: error -1 -> -0.2 as well
    assert adaptive_kl_coef(0.1, 0.0, 5.0, 10000, 100) == pytest.approx(0.0998, abs=1e-12)


def test_adaptive_kl_coef_inside_range():
    # kl 5.5: error 0.1 -> 0.1 * (1 + 0.1 * 0.01) = 0.1001
    assert adaptive_kl_coef(0.1, 5.5, 5.0, 10000, 100) == pytest.approx(0.1001, abs=1e-12)
    # kl 4.5: error -0.1 -> 0.1 * (1 - 0.001) = 0.0999
    assert adaptive_kl_coef(0.1, 4.5, 5.0, 10000, 100) == pytest.approx(0.0999, abs=1e-12)
    # kl on target: unchanged
    assert adaptive_kl_coef(0.1, 5.0, 5.0, 10000, 100) == pytest.approx(0.1, abs=1e-15)
    # n_steps / horizon scales the step: kl 5.5, 500 / 1000 -> 0.2 * (1 + 0.1 * 0.5) = 0.21
    assert adaptive_kl_coef(0.2, 5.5, 5.0, 1000, 500) == pytest.approx(0.21, abs=1e-12)
    assert isinstance(adaptive_kl_coef(0.1, 5.5, 5.0, 10000, 100), float)


# ---------------------------------------------------------------- normalise_scores


def test_normalise_scores_hand_values():
    # [1, 2, 3]: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    out = normalise_scores(t([1.0, 2.0, 3.0]))
    assert out.dtype == torch.float32
    assert close(out, [-1.0, 0.0, 1.0])
    # [2, 4, 6, 8]: mean 5, deviations [-3, -1, 1, 3], sample var 20 / 3, std 2.581989
    s = math.sqrt(20.0 / 3.0)
    assert close(normalise_scores(t([2.0, 4.0, 6.0, 8.0])), [-3 / s, -1 / s, 1 / s, 3 / s])
    assert 3 / s == pytest.approx(1.1618950, abs=1e-6)


def test_normalise_scores_single_and_equal_no_nan():
    one = normalise_scores(t([4.2]))
    assert not torch.isnan(one).any()
    assert one.tolist() == [0.0]  # only centred: 4.2 - 4.2
    same = normalise_scores(t([3.0, 3.0, 3.0]))
    assert not torch.isnan(same).any() and same.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- generate: finished rows dropped mid-way

VOCAB = 50
PAD = 0
NEVER = -1  # an eos id the model can never produce
GEN_PROMPTS = [[3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]  # lengths 2, 5, 9


@pytest.fixture(scope="module")
def gen_model() -> GPT:
    """As in test_model_generation.py: a small random GPT whose 2-D weights are re-drawn with std 0.3 so
    that greedy continuations are varied (the default init just repeats the last token)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def _greedy(model, prompts, n, eos_id):
    return generate(model, prompts, n, eos_id=eos_id, pad_id=PAD, temperature=0.0)


def _eos_choices(ref: list[list[int]]) -> list[int]:
    """EOS ids that make some rows stop early while others run on: the first greedy token of each row that
    no other row emits, and a token that stops two rows at two different steps while a third never emits it
    (two successive drops from the batch)."""
    choices = []
    for i, row in enumerate(ref):
        if not any(row[0] in other for j, other in enumerate(ref) if j != i):
            choices.append(row[0])
    for tok in sorted({x for row in ref for x in row}):
        stops = [row.index(tok) if tok in row else None for row in ref]
        hit = [s for s in stops if s is not None]
        if len(hit) == 2 and len(set(hit)) == 2 and min(hit) > 0:
            choices.append(tok)
            break
    return choices


def test_generate_drops_finished_rows_matches_alone(gen_model):
    n = 12
    ref = [_greedy(gen_model, [p], n, NEVER).responses[0].tolist() for p in GEN_PROMPTS]
    choices = _eos_choices(ref)
    assert len(choices) >= 2  # at least one "stops at step 0" and one "two stops at different steps" case
    for eos in choices:
        g = _greedy(gen_model, GEN_PROMPTS, n, eos)
        stops = [row.index(eos) if eos in row else None for row in ref]
        assert any(s is None for s in stops) and any(s is not None for s in stops), eos  # mixed: non-vacuous
        R = g.responses.shape[1]
        assert R == n  # a row never stops, so the output runs to max_new_tokens
        assert g.prompt_len == 9 and g.tokens.shape == (3, 9 + n)
        assert g.finished.tolist() == [s is not None for s in stops]
        for i, p in enumerate(GEN_PROMPTS):
            alone = _greedy(gen_model, [p], n, eos)
            a = alone.responses[0].tolist()
            assert alone.finished.tolist() == [stops[i] is not None]
            # same tokens as the prompt generated alone, then padding
            assert g.responses[i].tolist() == a + [PAD] * (R - len(a)), (eos, i)
            assert g.tokens[i, 9 - len(p):9].tolist() == p
            if stops[i] is None:
                assert a == ref[i]
                assert g.response_mask[i].tolist() == [1] * R
            else:
                s = stops[i]
                assert a == ref[i][:s + 1] and a[-1] == eos  # up to and including EOS
                assert g.response_mask[i].tolist() == [1] * (s + 1) + [0] * (R - s - 1)
            assert g.attention_mask[i, 9:].tolist() == g.response_mask[i].tolist()
            assert g.attention_mask[i, :9].tolist() == [0] * (9 - len(p)) + [1] * len(p)


def test_verifiable_or_model_reward_routes_by_task():
    """Exact match (times its weight) for verifiable tasks, the reward model's score for the others."""
    from llmstages.model import ScalarHead
    from llmstages.rollout import sample, sequence_reward_fn
    from llmstages.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["What's 1 + 1? 2\n"] * 4, vocab_size=280)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    head = ScalarHead(16)
    r = sample(model, [tok.encode_prompt("What's 1 + 1?")] * 3, 3, tok.eos_id, tok.pad_id)
    texts = [tok.decode(x.tolist()) for x in r.responses]
    model_score = sequence_reward_fn("model", tok, model, head)(r, texts, ["a"] * 3)
    routed = sequence_reward_fn("verifiable_or_model", tok, model, head, exact_match_weight=5.0,
                                verifiable_tasks=("arithmetic",))
    # rows 0, 1 verifiable: answer = the response itself (right) and "nope" (wrong); row 2 scored by the model
    got = routed(r, [texts[0], "nope", texts[2]], ["arithmetic", "arithmetic", "explain"])
    assert got.tolist() == pytest.approx([5.0, 0.0, float(model_score[2])])
    with pytest.raises(ValueError, match="unknown reward"):
        sequence_reward_fn("model+model", tok, model, head)
