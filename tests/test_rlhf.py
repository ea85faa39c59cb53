"""Behaviour of the three RLHF algorithms on a toy task, with a real Lightning Trainer.

The toy reward is a simple function of the output: the fraction of response tokens equal to ``TARGET``. From a
random tiny model (``TARGET`` has probability ~1/V), PPO and GRPO must raise it by sampling and optimising,
and DPO by learning from pairs whose chosen response is made of ``TARGET`` tokens (offline) or from the
best and worst of its own samples (online).
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import CONF

from llmstages.config import DPOSchema, GRPOSchema, PPOSchema
from llmstages.data.datasets import collate_pairs, collate_prompts
from llmstages.model import GPT, GPTConfig, ScalarHead
from llmstages.rollout import PhaseTimer, sample
from llmstages.stages.dpo import DPOModule, OnlineDPOModule
from llmstages.stages.grpo import GRPOModule
from llmstages.stages.ppo import PPOModule

PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = 0, 1, 2, 4, 5  # the ids of a tokenizer trained here

V, TARGET = 32, 9
IDS = dict(eos_id=EOS_ID, pad_id=PAD_ID)
PROMPTS = [[BOS_ID, USER_ID, k, k + 1, ASSISTANT_ID] for k in range(10, 26)]


def toy_reward(r, answers, tasks) -> torch.Tensor:
    """Fraction of each response's tokens that are ``TARGET`` ``(B,)``."""
    return ((r.responses == TARGET).float() * r.mask).sum(1) / r.mask.sum(1).clamp(min=1.0)


def tiny_policy(seed: int = 0) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    return policy, copy.deepcopy(policy)


def optim(lr: float, max_steps: int) -> dict:
    return dict(lr=lr, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, warmup_steps=1, max_steps=max_steps,
                min_lr_ratio=1.0)


def section(schema, **overrides):
    """The algorithm's typed settings: its config group's values (conf/rlhf_algorithm/, the papers' defaults)
    with ``overrides``."""
    name = {PPOSchema: "ppo", GRPOSchema: "grpo", DPOSchema: "dpo"}[schema]
    values = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF / "rlhf_algorithm" / f"{name}.yaml"),
                             overrides)
    return OmegaConf.to_object(values)


def fit(module: L.LightningModule, loader: DataLoader, max_steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true",
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return trainer


def mean_toy_reward(policy: GPT) -> float:
    torch.manual_seed(123)
    r = sample(policy, PROMPTS * 8, max_new_tokens=6, eos_id=EOS_ID, pad_id=PAD_ID)
    return float(toy_reward(r, None, None).mean())


def prompt_loader(batch_size: int) -> DataLoader:
    rows = [{"prompt_ids": p, "answer": "", "prompt": "", "task": ""} for p in PROMPTS]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_prompts)


def pair_loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = []
    for p in PROMPTS:
        other = torch.randint(10, V, (3,), generator=g).tolist()
        chosen, rejected = p + [TARGET] * 3 + [EOS_ID], p + other + [EOS_ID]
        mask = [0] * len(p) + [1] * 4
        items.append((chosen, rejected, mask, mask))
    return DataLoader(items, batch_size=batch_size, shuffle=True, drop_last=True,
                      collate_fn=partial(collate_pairs, pad_id=PAD_ID))


def make(algorithm: str, lr: float, steps: int):
    """(module, loader) for ``algorithm`` on the toy task."""
    policy, reference = tiny_policy()
    if algorithm.startswith("ppo"):
        c = section(PPOSchema, rollout_batch_size=16, minibatch_size=8, max_new_tokens=6, missing_eos_penalty=0.0,
                    kl_coef=0.01)
        critic = {}
        if algorithm == "ppo-critic":  # a separate value model (as when initialised from the reward model)
            critic = dict(critic=tiny_policy(seed=1)[0], critic_head=ScalarHead(32))
        return PPOModule(policy, reference, toy_reward, optim(lr, steps), c, 1.0, **IDS, **critic), prompt_loader(16)
    if algorithm == "grpo":
        c = section(GRPOSchema, prompts_per_step=4, group_size=4, minibatch_size=8, max_new_tokens=6,
                    missing_eos_penalty=0.0, kl_coef=0.01)
        return GRPOModule(policy, reference, toy_reward, optim(lr, steps), c, 1.0, **IDS), prompt_loader(4)
    if algorithm == "dpo-online":  # pairs sampled from the policy, ranked by the toy reward
        c = section(DPOSchema, pairs="online", prompts_per_step=4, samples_per_prompt=4, minibatch_size=2,
                    max_new_tokens=6, missing_eos_penalty=0.0, beta=0.1)
        return OnlineDPOModule(policy, reference, toy_reward, optim(lr, steps), c, 1.0, **IDS), prompt_loader(4)
    c = section(DPOSchema, batch_size=8, beta=0.1)
    return DPOModule(policy, reference, optim(lr, steps), c), pair_loader(8)


@pytest.mark.parametrize("algorithm,lr,steps", [("ppo", 1e-2, 40), ("ppo-critic", 1e-2, 40), ("grpo", 1e-2, 24),
                                                ("dpo", 3e-3, 60), ("dpo-online", 1e-2, 40)])
def test_each_algorithm_raises_a_toy_reward(algorithm, lr, steps):
    module, loader = make(algorithm, lr, steps)
    before = mean_toy_reward(module.policy)
    trainer = fit(module, loader, steps)
    after = mean_toy_reward(module.policy)
    assert trainer.global_step == steps
    assert before < 0.1, before  # ~1/V from a random model
    assert after > before + 0.3, (before, after)
    assert set(module.timer.seconds) >= {"scoring", "optimisation"}


@pytest.mark.parametrize("algorithm", ["ppo", "ppo-critic", "grpo", "dpo", "dpo-online"])
def test_every_trainable_parameter_changes_and_reference_does_not(algorithm):
    module, loader = make(algorithm, 1e-3, 4)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    fit(module, loader, 4)
    trainable = [k for k, v in module.named_parameters() if v.requires_grad]
    assert trainable and all(k.startswith(("policy.", "value_head.", "critic.")) for k in trainable)
    assert any(k.startswith("critic.") for k in trainable) == (algorithm == "ppo-critic")
    unchanged = [k for k in trainable if torch.equal(before[k], dict(module.named_parameters())[k])]
    assert not unchanged, unchanged
    frozen = [k for k, v in module.named_parameters() if k.startswith("reference.")]
    assert frozen and all(torch.equal(before[k], dict(module.named_parameters())[k]) for k in frozen)


def test_ppo_adaptive_kl_coefficient_follows_ziegler_controller():
    module, loader = make("ppo", 1e-2, 16)  # 4 iterations of 16 rollouts
    module.c = dataclasses.replace(module.c, kl_target=1e-6, kl_horizon=100, kl_estimator="k3")
    fit(module, loader, 16)
    # iteration 1: policy == reference, KL exactly 0 -> error clipped to -0.2; then KL > target -> +0.2 each time
    step = 0.2 * 16 / 100
    assert float(module.kl_coef) == pytest.approx(0.01 * (1 - step) * (1 + step) ** 3, rel=1e-5)


def test_phase_timer_sums_and_summarises():
    t = PhaseTimer()
    with t("generation"):
        pass
    with t("generation"):
        pass
    assert list(t.seconds) == ["generation"] and t.seconds["generation"] >= 0
    assert t.summary().startswith("generation ") and "(100%)" in t.summary()
