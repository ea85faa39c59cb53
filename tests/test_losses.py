"""Tests for llmstages.losses: every expected value is computed by hand (math.*), never by the function itself."""

import math

import pytest
import torch

from llmstages.losses import (
    bradley_terry_loss, gae, kl_estimate, masked_mean, next_token_loss, ppo_policy_loss, token_cross_entropy,
    token_logprobs, value_loss, whiten,
)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-6):
    return actual.float().tolist() == pytest.approx(expected, abs=tol)


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_normal():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 0, 1], [0, 1, 0]], torch.long)
    # (1 + 3 + 5) / 3 = 3
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    bool_mask = t([[True, True, False], [False, False, True]], torch.bool)
    # (1 + 2 + 6) / 3 = 3
    assert masked_mean(x, bool_mask).item() == pytest.approx(3.0)


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = t([[1.0, 4.0], [2.0, 3.0]])
    out = masked_mean(x, torch.zeros(2, 2, dtype=torch.long))
    assert not torch.isnan(out)
    assert out.item() == 0.0


# ---------------------------------------------------------------- next_token_loss

# logits (1, 3, 2), targets (1, 3)
LOGITS = [[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]
TARGETS = [[0, 0, 1]]
# CE_t = -log softmax(logits_t)[target_t] = logsumexp(logits_t) - logits_t[target_t]
CE0 = math.log(math.exp(2.0) + math.exp(0.0)) - 2.0  # = log(1 + e^-2) ~ 0.126928
CE1 = math.log(math.exp(0.0) + math.exp(1.0)) - 0.0  # = log(1 + e)   ~ 1.313262
CE2 = math.log(math.exp(1.0) + math.exp(1.0)) - 1.0  # = log 2        ~ 0.693147


def test_next_token_loss_masked_hand_value():
    mask = t([[1, 0, 1]], torch.long)
    loss = next_token_loss(t(LOGITS), t(TARGETS, torch.long), mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((CE0 + CE2) / 2, abs=1e-6)
    assert (CE0 + CE2) / 2 == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2)


def test_next_token_loss_no_mask_is_mean_over_all():
    loss = next_token_loss(t(LOGITS), t(TARGETS, torch.long))
    assert loss.item() == pytest.approx((CE0 + CE1 + CE2) / 3, abs=1e-6)


def test_next_token_loss_all_zero_mask_raises():
    with pytest.raises(ValueError):
        next_token_loss(t(LOGITS), t(TARGETS, torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_next_token_loss_bf16_matches_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.randint(0, 2, (2, 5))
    mask[0, 0] = 1
    ref = next_token_loss(logits, targets, mask)
    low = next_token_loss(logits.to(torch.bfloat16), targets, mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), abs=1e-2)
    # and the exactly-representable hand example in bf16
    hand = next_token_loss(t(LOGITS, torch.bfloat16), t(TARGETS, torch.long), t([[1, 0, 1]], torch.long))
    assert hand.item() == pytest.approx((CE0 + CE2) / 2, abs=1e-2)


# ---------------------------------------------------------------- token_logprobs


def test_token_logprobs_hand_value():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = t([[2, 1]], torch.long)
    lse0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    expected = [3.0 - lse0, -math.log(3.0)]  # uniform over 3 -> log(1/3)
    out = token_logprobs(logits, targets)
    assert out.shape == (1, 2)
    assert close(out[0], expected)


def test_token_logprobs_float32_for_bf16():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], torch.bfloat16)
    out = token_logprobs(logits, t([[2, 1]], torch.long))
    assert out.dtype == torch.float32
    lse0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    assert close(out[0], [3.0 - lse0, -math.log(3.0)], tol=1e-5)  # inputs exact in bf16, softmax in fp32


def test_token_cross_entropy_gradient_is_softmax_minus_onehot():
    """Logits [0, ln 3], target 1: p = [1/4, 3/4], loss = ln(4/3); d loss / d logits = g (p - onehot)."""
    logits = t([[0.0, math.log(3.0)], [0.0, 0.0]]).requires_grad_()
    loss = token_cross_entropy(logits, t([1, 0], torch.long))
    assert close(loss, [math.log(4 / 3), math.log(2.0)])
    loss.backward(t([2.0, -1.0]))  # an incoming gradient of each sign (an RL advantage can be negative)
    assert close(logits.grad.flatten(), [2 * 0.25, 2 * -0.25, -1 * (0.5 - 1), -1 * 0.5])


def test_token_cross_entropy_and_logprobs_match_autograd():
    """Values equal F.cross_entropy's; the written-out backward equals autograd's (float64: gradcheck too), for
    float32 and bf16 logits (the gradient in the logits' dtype)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, 97).to(dtype).requires_grad_()
        y, g = torch.randint(0, 97, (40,)), torch.randn(40)
        ours = token_cross_entropy(x, y)
        (ours * g).sum().backward()
        got = x.grad.clone()
        x.grad = None
        ref = torch.nn.functional.cross_entropy(x.float(), y, reduction="none")
        (ref * g).sum().backward()
        assert torch.equal(ours, ref) and got.dtype == dtype
        torch.testing.assert_close(got.float(), x.grad.float(), rtol=1e-5, atol=1e-7)
    x64, y = torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.tensor([[0, 6, 3, 3, 1]])
    (token_logprobs(x64.view(1, 5, 7), y) * g[:5]).sum().backward()
    got = x64.grad.clone()
    x64.grad = None
    ref = torch.log_softmax(x64, -1).gather(-1, y.view(5, 1)).flatten()
    (ref * g[:5]).sum().backward()
    torch.testing.assert_close(got, x64.grad, rtol=1e-12, atol=1e-14)
    assert token_logprobs(x64, y.view(5)).shape == (5,)  # any leading shape: (N, V) and (N,) too


def test_token_cross_entropy_second_backward_raises():
    """The backward reuses the saved log-softmax in place: a second backward through the same graph is refused
    by autograd, never a silently wrong gradient."""
    x = torch.randn(3, 5, requires_grad=True)
    loss = token_cross_entropy(x, torch.tensor([0, 1, 2])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- bradley_terry_loss


def test_bradley_terry_hand_value():
    # -log sigmoid(d) = log(1 + exp(-d)); d = r_c - r_r = [1, -2]
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    loss = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)


# ---------------------------------------------------------------- kl_estimate

LOGP = [[-1.0, -2.0, -0.5]]
REF = [[-1.5, -1.0, -0.5]]
# log_ratio = logp - ref = [0.5, -1.0, 0.0]


def test_kl_k1_k2_k3_hand_values():
    logp, ref = t(LOGP), t(REF)
    assert close(kl_estimate(logp, ref, "k1")[0], [0.5, -1.0, 0.0])
    assert close(kl_estimate(logp, ref)[0], [0.5, -1.0, 0.0])  # default k1
    assert close(kl_estimate(logp, ref, "k2")[0], [0.5 ** 2 / 2, (-1.0) ** 2 / 2, 0.0])  # [0.125, 0.5, 0]
    # k3 = exp(ref - logp) - 1 - (ref - logp)
    k3 = [math.exp(-0.5) - 1 - (-0.5), math.exp(1.0) - 1 - 1.0, math.exp(0.0) - 1 - 0.0]
    assert close(kl_estimate(logp, ref, "k3")[0], k3)
    assert k3 == pytest.approx([0.1065307, 0.7182818, 0.0], abs=1e-6)


def test_kl_k3_nonnegative_random():
    torch.manual_seed(0)
    logp = torch.randn(1000) * 3
    ref = torch.randn(1000) * 3
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_estimate(t(LOGP), t(REF), "k4")


# ---------------------------------------------------------------- gae


def test_gae_hand_values():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = t([[0.0, 0.0, 0.0, 1.0],
                 [0.0, 1.0, 0.7, 0.7]])  # row 1: rewards after the mask must be ignored
    values = t([[0.5, 0.4, 0.3, 0.2],
                [0.5, 0.4, 0.3, 0.2]])
    mask = t([[1, 1, 1, 1],
              [1, 1, 0, 0]], torch.long)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)

    # Row 0: delta_t = r_t + 0.9 * V_{t+1} - V_t, V_4 = 0
    d3 = 1.0 + 0.9 * 0.0 - 0.2  # 0.8
    d2 = 0.0 + 0.9 * 0.2 - 0.3  # -0.12
    d1 = 0.0 + 0.9 * 0.3 - 0.4  # -0.13
    d0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    a3 = d3                     # 0.8
    a2 = d2 + 0.72 * a3         # -0.12 + 0.576 = 0.456
    a1 = d1 + 0.72 * a2         # -0.13 + 0.32832 = 0.19832
    a0 = d0 + 0.72 * a1         # -0.14 + 0.1427904 = 0.0027904
    assert [a0, a1, a2, a3] == pytest.approx([0.0027904, 0.19832, 0.456, 0.8])
    assert close(adv[0], [a0, a1, a2, a3])
    assert close(ret[0], [a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.2])  # [0.5027904, 0.59832, 0.756, 1.0]

    # Row 1: valid tokens 0..1; V_2 treated as 0
    e1 = 1.0 + 0.9 * 0.0 - 0.4  # 0.6
    e0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    b1 = e1                     # 0.6
    b0 = e0 + 0.72 * b1         # -0.14 + 0.432 = 0.292
    assert close(adv[1], [b0, b1, 0.0, 0.0])
    assert close(ret[1], [b0 + 0.5, b1 + 0.4, 0.0, 0.0])  # [0.792, 1.0, 0, 0]
    assert [b0 + 0.5, b1 + 0.4] == pytest.approx([0.792, 1.0])


# ---------------------------------------------------------------- whiten


def test_whiten_several_valid_tokens():
    x = t([[1.0, 2.0, 3.0, 100.0],
           [4.0, 5.0, -7.0, 9.0]])
    mask = t([[1, 1, 1, 0],
              [1, 1, 0, 0]], torch.long)
    out = whiten(x, mask)
    # valid values 1..5: mean 3, unbiased var = (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    s = math.sqrt(2.5)
    assert close(out[0], [-2 / s, -1 / s, 0.0, 0.0], tol=1e-5)
    assert close(out[1], [1 / s, 2 / s, 0.0, 0.0], tol=1e-5)
    valid = out[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    assert (out[~mask.bool()] == 0).all()


def test_whiten_single_valid_token():
    x = t([[3.0, 7.0, 11.0]])
    out = whiten(x, t([[0, 1, 0]], torch.long))
    assert not torch.isnan(out).any()
    assert out.tolist() == [[0.0, 0.0, 0.0]]  # 7 - mean(7) = 0; outside mask 0


def test_whiten_zero_valid_tokens():
    x = t([[3.0, 7.0, 11.0]])
    out = whiten(x, torch.zeros(1, 3, dtype=torch.long))
    assert not torch.isnan(out).any()
    assert out.tolist() == [[0.0, 0.0, 0.0]]


# ---------------------------------------------------------------- ppo_policy_loss


def ppo(log_ratio, adv, clip=0.2):
    logp = t([[log_ratio]])
    return ppo_policy_loss(logp, torch.zeros(1, 1), t([[adv]]), torch.ones(1, 1), clip_range=clip)


@pytest.mark.parametrize("adv", [2.0, -2.0])
def test_ppo_ratio_inside_clip_range(adv):
    loss, clipfrac = ppo(0.1, adv)
    ratio = math.exp(0.1)  # 1.10517 in [0.8, 1.2]
    assert loss.item() == pytest.approx(-adv * ratio, abs=1e-6)  # -2.2103 / +2.2103
    assert clipfrac.item() == 0.0


def test_ppo_ratio_above_clip_positive_advantage_is_clipped():
    loss, clipfrac = ppo(0.5, 2.0)  # ratio e^0.5 = 1.6487 > 1.2
    assert loss.item() == pytest.approx(-2.0 * 1.2, abs=1e-6)  # -2.4
    assert clipfrac.item() == 1.0


def test_ppo_ratio_below_clip_negative_advantage_is_clipped():
    loss, clipfrac = ppo(-0.5, -2.0)  # ratio e^-0.5 = 0.6065 < 0.8
    # max(-A*r, -A*0.8) = max(1.2131, 1.6) = 1.6, the pessimistic side
    assert loss.item() == pytest.approx(2.0 * 0.8, abs=1e-6)
    assert clipfrac.item() == 1.0


def test_ppo_outside_range_but_unclipped_is_pessimistic():
    # A > 0 with ratio below range: max(-2*0.6065, -2*0.8) = -1.2131 (unclipped)
    loss, clipfrac = ppo(-0.5, 2.0)
    assert loss.item() == pytest.approx(-2.0 * math.exp(-0.5), abs=1e-6)
    assert clipfrac.item() == 0.0
    # A < 0 with ratio above range: max(2*1.6487, 2*1.2) = 3.2974 (unclipped)
    loss, clipfrac = ppo(0.5, -2.0)
    assert loss.item() == pytest.approx(2.0 * math.exp(0.5), abs=1e-6)
    assert clipfrac.item() == 0.0


def test_ppo_batch_mean_over_mask():
    logp = t([[0.1, 0.5, -0.5, 3.0]])
    adv = t([[2.0, 2.0, -2.0, 5.0]])
    mask = t([[1, 1, 1, 0]], torch.long)  # last position ignored
    loss, clipfrac = ppo_policy_loss(logp, torch.zeros(1, 4), adv, mask, clip_range=0.2)
    expected = (-2.0 * math.exp(0.1) - 2.0 * 1.2 + 2.0 * 0.8) / 3  # (-2.2103 - 2.4 + 1.6) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------- value_loss


def test_value_loss_clip_not_binding():
    # V=1.0, V_old=0.5, R=0.0: unclipped (1-0)^2 = 1; clipped V = 0.5+0.2 = 0.7 -> 0.49; max = 1
    loss = value_loss(t([[1.0]]), t([[0.5]]), t([[0.0]]), torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.0, abs=1e-6)


def test_value_loss_clip_binding():
    # V=1.0, V_old=0.5, R=1.5: unclipped (1-1.5)^2 = 0.25; clipped V = 0.7 -> (0.7-1.5)^2 = 0.64; max = 0.64
    loss = value_loss(t([[1.0]]), t([[0.5]]), t([[1.5]]), torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64, abs=1e-6)


def test_value_loss_unclipped_and_masked():
    values, old, ret = t([[1.0, 3.0, 9.0]]), t([[0.5, 0.0, 0.0]]), t([[1.5, 1.0, 0.0]])
    mask = t([[1, 1, 0]], torch.long)
    # plain: 0.5 * mean((1-1.5)^2, (3-1)^2) = 0.5 * (0.25 + 4) / 2 = 1.0625
    assert value_loss(values, old, ret, mask, clip_range=None).item() == pytest.approx(0.5 * (0.25 + 4.0) / 2)
    # clipped: pos0 max(0.25, 0.64) = 0.64; pos1 V clipped to 0.2: max(4, (0.2-1)^2=0.64) = 4
    assert value_loss(values, old, ret, mask, clip_range=0.2).item() == pytest.approx(0.5 * (0.64 + 4.0) / 2)
