"""What the RL algorithms share: sampling a batch of responses, per-token log-probabilities of the responses
under a model, sequence rewards, a timer that splits a run into generation, scoring and optimisation, and the
two records between the rlhf stage and an algorithm (:class:`RLInputs` in, :class:`RLRun` out).

Shapes: ``B`` responses, ``P`` padded prompt length, ``N`` response length, ``T = P + N``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import REWARDS  # noqa: F401  (the allowed values, defined once with the schema)
from .data.datasets import PROMPT_FIELDS, PromptDataset, collate_prompts, read_jsonl, shuffled_loader, task_weights
from .evaluation import full_attention, normalise, reward_scores
from .generation import generate
from .losses import token_logprobs
from .model import GPT, ScalarHead


@dataclass
class Rollout:
    """A batch of sampled responses.

    Attributes:
        tokens: ``(B, T)`` left-padded prompts then responses; ``P`` is the padded prompt length.
        attn: ``(B, T, T)`` causal attention mask over real tokens; ``pos``: ``(B, T)`` position ids.
        mask: ``(B, N)`` float, 1 on generated tokens up to and including EOS.
        finished: ``(B,)`` True where the response ended with EOS.
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    P: int
    mask: torch.Tensor
    finished: torch.Tensor
    token_mask: torch.Tensor  # (B, T) 1 on real tokens, for the reward model

    @property
    def responses(self) -> torch.Tensor:
        """Response ids ``(B, N)`` (PAD after EOS)."""
        return self.tokens[:, self.P:]

    def rows(self, idx: torch.Tensor) -> "Rollout":
        """The sub-batch ``idx`` (a minibatch)."""
        return Rollout(self.tokens[idx], self.attn[idx], self.pos[idx], self.P, self.mask[idx], self.finished[idx],
                       self.token_mask[idx])


def sample(policy: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt (lists of ids; repeat a prompt for several) with the KV cache, drawing from
    ``generator`` (on the policy's device; the global RNG when None)."""
    g = generate(policy, prompts, max_new_tokens, eos_id, pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=generator)
    amask = g.attention_mask.clone()
    attn, pos = full_attention(amask)
    return Rollout(g.tokens.clone(), attn, pos, g.prompt_len, g.response_mask.clone().float(), g.finished.clone(),
                   amask)


def iteration_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The random stream of one RL iteration (its sampling and its minibatch order) on ``device``: a generator
    seeded from ``(seed, step, rank)`` alone (``step``: the optimizer steps before the iteration), so a run
    resumed from a checkpoint draws what the uninterrupted run drew, with no RNG state to save, and DDP processes
    draw independently."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def minibatches(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Row indices ``0..n-1`` in a random order from ``generator``, split into minibatches of ``size`` (the
    last one smaller when ``size`` does not divide ``n``), on the generator's device."""
    return torch.randperm(n, generator=generator, device=generator.device).split(size)


def response_hidden(model: GPT, r: Rollout) -> torch.Tensor:
    """Hidden states ``(B, N, D)`` at the positions that predict each response token."""
    return model.hidden(r.tokens, positions=r.pos, attn_mask=r.attn)[:, r.P - 1:-1]


def response_logprobs(model: GPT, r: Rollout, value_head: ScalarHead | None = None):
    """Log-probabilities ``(B, N)`` (float32, nats) of the response tokens under ``model``, and the logits
    ``(B, N, V)``; with ``value_head``, also its values ``(B, N)``."""
    h = response_hidden(model, r)
    logits = model.lm_head(h)
    logp = token_logprobs(logits, r.responses)
    if value_head is None:
        return logp, logits
    return logp, logits, value_head(h).float()


def outside_inference(out: dict) -> dict:
    """The tensors of ``out`` copied out of inference mode: scoring runs under ``torch.inference_mode`` (no
    autograd bookkeeping at all), and its results feed the policy update, which autograd may save."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


RewardFn = Callable[["Rollout", list[str], list[str]], torch.Tensor]
"""A sequence reward: ``(rollout, reference answers, tasks) -> (B,)`` float scores, one per response."""


def sequence_reward_fn(kind: str, tok, reward_model: GPT | None = None, reward_head: ScalarHead | None = None,
                       exact_match_weight: float = 1.0, verifiable_tasks: tuple[str, ...] = ()) -> RewardFn:
    """The reward of each whole response, as a :data:`RewardFn`.

    ``kind="model"``: the reward model's score at the last real token (EOS or truncation point).
    ``kind="exact_match"``: ``exact_match_weight`` where the decoded response equals the row's reference answer
    after whitespace normalisation (a verifiable reward, meaningful for the arithmetic set), else 0.0.
    ``kind="model+exact_match"``: the sum of the two.
    ``kind="verifiable_or_model"``: the exact-match reward for rows whose task is in ``verifiable_tasks``, the
    reward model's score for the others: a checkable answer is rewarded by checking it, everything else by
    the learned preference model (reward routing as in Tülu 3, Lambert et al. 2024, §6).

    Raises:
        ValueError: for an unknown ``kind``, or a reward-model kind without a reward model.
    """
    routed = kind == "verifiable_or_model"
    parts = ["model", "exact_match"] if routed else kind.split("+")
    if not parts or any(p not in ("model", "exact_match") for p in parts) or len(set(parts)) < len(parts):
        raise ValueError(f"unknown reward {kind!r}; expected one of {', '.join(REWARDS)}")
    if "model" in parts and (reward_model is None or reward_head is None):
        raise ValueError(f"reward {kind!r} needs a reward model and its head")

    def reward(r: Rollout, answers: list[str], tasks: list[str]) -> torch.Tensor:
        device = r.tokens.device
        verifiable = torch.tensor([t in verifiable_tasks for t in tasks], device=device) if routed else None
        total = torch.zeros(r.tokens.shape[0], device=device)
        if "model" in parts:
            score = reward_scores(reward_model, reward_head, r.tokens, r.token_mask)
            total += score.masked_fill(verifiable, 0.0) if routed else score
        if "exact_match" in parts:
            texts = [tok.decode(row.tolist()) for row in r.responses]
            hits = torch.tensor([float(bool(a) and normalise(t) == normalise(a)) for t, a in zip(texts, answers)],
                                device=device)
            total += exact_match_weight * (hits * verifiable if routed else hits)
        return total

    return reward


def penalised_rewards(reward_fn: RewardFn, r: Rollout, rows: list[dict], missing_eos_penalty: float) -> torch.Tensor:
    """``reward_fn``'s scores ``(B,)`` of the responses to ``rows`` (``{"answer", "task"}`` each) minus
    ``missing_eos_penalty`` for responses that never emitted EOS (Huang et al. 2024, the no-EOS penalty)."""
    scores = reward_fn(r, [b["answer"] for b in rows], [b.get("task", "") for b in rows])
    return scores - missing_eos_penalty * (~r.finished).float()


def rollout_stats(r: Rollout, timer: "PhaseTimer") -> dict:
    """What PPO and GRPO both log about a rollout: mean response length (tokens), EOS fraction, and the
    seconds spent so far in each phase."""
    return {"train/response_tokens": r.mask.sum(1).mean(), "train/eos_fraction": r.finished.float().mean(),
            **timer.metrics()}


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over a run: ``with timer("generation"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """Seconds per phase as tracker metrics: ``{"time/<phase>_s": seconds}``."""
        return {f"time/{k}_s": v for k, v in self.seconds.items()}

    def summary(self) -> str:
        """One line: each phase's seconds and share of the timed total."""
        total = sum(self.seconds.values()) or 1.0
        return ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.seconds.items())


@dataclass
class RLInputs:
    """What every RL algorithm builds from (the rlhf stage fills it): the policy and its frozen reference (both
    the SFT model at the start), the reward model and its head, the tokenizer, the data stage's folder, the
    plain optimizer arguments (:func:`~llmstages.optim.adamw_with_schedule`), the seed and the run's optimizer
    steps (``trainer.max_steps``)."""

    policy: GPT
    reference: GPT
    reward_model: GPT
    reward_head: ScalarHead
    tok: Any
    data_dir: Path
    optim: dict
    grad_clip: float
    seed: int
    max_steps: int
    micro_batches: int = 1  # per optimizer step (trainer.accumulate_grad_batches), where the Trainer steps
    balance_tasks: bool = True
    num_workers: int = 0
    lora: dict | None = None  # add_lora's arguments when the policy trains LoRA adapters (then also a PPO critic)

    def loader(self, dataset, tasks: list[str], batch_size: int, batches: int, **kwargs) -> "TrainLoader":
        """The training loader of ``batches`` batches of ``dataset``, drawn task-balanced (``balance_tasks``:
        :func:`~llmstages.data.datasets.task_weights`) or shuffled, in the resumable order of
        :func:`~llmstages.data.datasets.shuffled_loader`; built per process once the Trainer knows the world."""
        weights = task_weights(tasks) if self.balance_tasks else None
        return lambda world_size, rank: shuffled_loader(dataset, batches, self.seed, world_size, rank,
                                                        batch_size=batch_size, weights=weights, **kwargs)

    def iterations(self, updates_per_iteration: int) -> int:
        """Iterations of an algorithm that steps the optimizer ``updates_per_iteration`` times per iteration
        needed for the run's ``max_steps`` optimizer steps."""
        return math.ceil(self.max_steps / updates_per_iteration)

    def reward(self, s) -> RewardFn:
        """The sequence reward that settings ``s`` (``reward``, ``exact_match_weight``, ``verifiable_tasks``) name."""
        return sequence_reward_fn(s.reward, self.tok, self.reward_model, self.reward_head, s.exact_match_weight,
                                  tuple(s.verifiable_tasks))

    def reward_modules(self, s) -> tuple[torch.nn.Module, ...]:
        """The modules the reward of ``s`` runs (frozen, moved to the device with the LightningModule)."""
        return (self.reward_model, self.reward_head) if "model" in s.reward else ()

    def prompts(self, s, per_iteration: int, name: str, updates_per_iteration: int) -> "TrainLoader":
        """The training prompts (``prompts_train.jsonl``) in batches of ``per_iteration``, one per iteration of
        ``updates_per_iteration`` optimizer steps, each cut to leave room for ``s.max_new_tokens`` in the
        policy's context.

        Raises:
            ValueError: when ``max_new_tokens`` leaves fewer than 4 prompt tokens (``rlhf.<name>.max_new_tokens``).
        """
        max_prompt = self.policy.cfg.max_seq_len - s.max_new_tokens
        if max_prompt < 4:
            raise ValueError(f"rlhf.{name}.max_new_tokens={s.max_new_tokens} leaves no room for a prompt in the "
                             f"policy's context of {self.policy.cfg.max_seq_len} tokens")
        prompts = PromptDataset(read_jsonl(self.data_dir / "prompts_train.jsonl", PROMPT_FIELDS), self.tok, max_prompt)
        return self.loader(prompts, [p["task"] for p in prompts.items], per_iteration,
                           self.iterations(updates_per_iteration), collate_fn=collate_prompts,
                           num_workers=self.num_workers)


TrainLoader = Callable[[int, int], Any]
"""``(world_size, rank) -> DataLoader``: a process's training loader, made once the Trainer is built."""


@dataclass
class RLRun:
    """What an algorithm's ``build`` gives the rlhf stage: the LightningModule, its training loader (a
    :data:`TrainLoader`, made per process) and validation loader, the head saved with
    the policy (PPO's value head when it lives on the policy), and the algorithm's own final metrics, computed
    after training from the Trainer (all processes call it)."""

    module: Any  # a LightningModule with a ``policy`` and a ``timer`` (PhaseTimer)
    train_dl: TrainLoader
    val_dl: DataLoader | None = None
    saved_head: ScalarHead | None = None
    final_metrics: Callable[[Any], dict] = field(default=lambda trainer: {})
