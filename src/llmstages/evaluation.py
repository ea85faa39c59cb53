"""Held-out evaluation: exact match by greedy generation (per task, with Wilson 95% intervals), response length,
EOS rate, reward-model score, and preference accuracy (chosen vs rejected log-probability)."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .data.datasets import PreferenceDataset, collate_pairs
from .data.formats import read_canonical
from .generation import Generation, generate, positions_from_mask
from .losses import token_logprobs
from .model import GPT, ScalarHead, last_token_index


def eval_subset(rows: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """A fixed, seeded sample of at most ``limit`` rows of each ``task`` (``0`` = all), kept in file order."""
    if not limit:
        return rows
    by_task = defaultdict(list)
    for i, r in enumerate(rows):
        by_task[r.get("task")].append(i)
    keep = set()
    for task, idx in by_task.items():
        keep |= set(idx) if len(idx) <= limit else set(random.Random(f"{seed}:{task}").sample(idx, limit))
    return [r for i, r in enumerate(rows) if i in keep]


def normalise(text: str) -> str:
    """Answer normalisation for exact match: surrounding whitespace stripped, inner runs collapsed."""
    return " ".join(text.split())


def full_attention(tokens_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention mask ``(B, T, T)`` over real tokens and position ids ``(B, T)`` for a padded batch."""
    T = tokens_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens_mask.device).tril()
    attn = causal[None] & tokens_mask.bool()[:, None, :]
    attn |= torch.eye(T, dtype=torch.bool, device=tokens_mask.device)[None]
    return attn, positions_from_mask(tokens_mask)


@torch.no_grad()
def reward_scores(model: GPT, head: ScalarHead, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score ``(B,)``: the scalar head read at the last real token of each (any-padded) row."""
    attn, pos = full_attention(mask)
    h = model.hidden(tokens, positions=pos, attn_mask=attn)
    return head(h).gather(1, last_token_index(mask)[:, None]).squeeze(1).float()


def generate_answers(model: GPT, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                     temperature: float = 0.0) -> tuple[list[str], list[Generation]]:
    """Greedy (by default) responses to ``prompts`` as text, plus the raw generations per batch."""
    texts, gens = [], []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.encode_prompt(p) for p in prompts[i:i + batch_size]]
        g = generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature)
        gens.append(g)
        texts += [tok.decode(r.tolist()) for r in g.responses]
    return texts, gens


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n`` (Wilson 1927; Agresti & Coull 1998, eq. 2): the 95%
    interval by default. Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n.

    Raises:
        ValueError: ``n < 1`` or ``k`` outside ``0..n``.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(name: str, hits: list[bool]) -> dict[str, float]:
    """``{name, name_ci95_low, name_ci95_high}``: the fraction of true ``hits`` and its Wilson 95% interval;
    empty for no hits."""
    if not hits:
        return {}
    low, high = wilson_interval(sum(hits), len(hits))
    return {name: sum(hits) / len(hits), f"{name}_ci95_low": low, f"{name}_ci95_high": high}


def per_task(name: str, hits: list[bool], tasks: list[str]) -> dict[str, float]:
    """:func:`proportion` of ``hits`` for each task, keyed ``name_<task>``."""
    out: dict[str, float] = {}
    for task in sorted(set(tasks)):
        out |= proportion(f"{name}_{task}", [h for h, t in zip(hits, tasks) if t == task])
    return out


def answer_metrics(rows: list[dict], responses: list[str], gens: list[Generation]) -> dict[str, float]:
    """Exact match overall and per ``task`` (``exact_match_<task>``), each with its Wilson 95% interval
    (:func:`proportion`), the number of questions per task (``questions_<task>``), mean response length (tokens)
    and the fraction of responses ending in EOS."""
    hits = [normalise(r) == normalise(row["answer"]) for row, r in zip(rows, responses)]
    by_task = defaultdict(list)
    for h, row in zip(hits, rows):
        by_task[row.get("task") or "user"].append(h)
    lengths = torch.cat([g.response_mask.sum(1).float() for g in gens])
    finished = torch.cat([g.finished.float() for g in gens])
    out = proportion("exact_match", hits)
    for task in sorted(by_task):
        out |= {**proportion(f"exact_match_{task}", by_task[task]), f"questions_{task}": len(by_task[task])}
    return {**out, "mean_response_tokens": float(lengths.mean()), "eos_fraction": float(finished.mean())}


def pair_logprobs(model: GPT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities (nats) of the chosen ``(B,)`` and rejected ``(B,)`` rows of a
    :func:`~llmstages.data.datasets.collate_pairs` batch (``tokens``/``loss_mask`` ``(2B, T)``).

    The LM head and log-softmax run at the ``N`` response positions only (``(N, V)`` logits, not ``(2B, T, V)``):
    the same sums as :func:`~llmstages.losses.sequence_logprobs` of every position's logits, without the prompt
    and padding positions' share of the head. Right padding needs no attention mask: causal attention never
    lets a real token see the padding after it."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    targets, response = tokens[:, 1:], mask[:, 1:].bool()
    hidden = model.hidden(tokens[:, :-1])  # (2B, T-1, D)
    logp = token_logprobs(model.lm_head(hidden[response]), targets[response])  # (N,)
    rows = torch.arange(len(tokens), device=tokens.device)[:, None].expand_as(response)[response]
    sums = torch.zeros(len(tokens), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums.chunk(2)


def task_balanced(name: str, values: torch.Tensor, tasks: list[str]) -> dict[str, float]:
    """``{name_<task>: mean over that task's rows}`` for each task and ``{name: the mean of those means}``: a
    task-balanced average, so that a task with many held-out rows (arithmetic) does not drown the others."""
    means = {t: float(values[[i for i, x in enumerate(tasks) if x == t]].float().mean()) for t in sorted(set(tasks))}
    return {name: sum(means.values()) / len(means), **{f"{name}_{t}": v for t, v in means.items()}}


def win_rate(scores: torch.Tensor, base_scores: torch.Tensor, tasks: list[str]) -> dict[str, float]:
    """Win rate of responses scored ``scores`` ``(n,)`` against ``base_scores`` ``(n,)`` on the same prompts, a
    tie counting half (as in AlpacaEval), task-balanced (:func:`task_balanced`): ``win_rate`` and
    ``win_rate_<task>``; ``tie_rate`` is the task-balanced fraction of ties (e.g. identical answers)."""
    wins = (scores > base_scores).float() + 0.5 * (scores == base_scores).float()
    return {**task_balanced("win_rate", wins, tasks), "tie_rate": task_balanced("t", scores == base_scores, tasks)["t"]}


def heldout_pairs(path: Path, tok, max_len: int, limit: int = 0, batch_size: int = 64) -> tuple[DataLoader, list[str]]:
    """The held-out preference pairs of ``path`` (canonical JSONL), at most ``limit`` of each task (the same
    seeded sample as :func:`eval_subset`; ``0`` = all), as a DataLoader of
    :func:`~llmstages.data.datasets.collate_pairs` batches, and each pair's task in loader order.

    The loader goes through the pairs shortest first, so that each batch is padded to about its own length
    (most held-out pairs are short sums, a few are long explanations): the same pairs and log-probabilities as
    file order, at a fraction of the padded positions."""
    rows = eval_subset(read_canonical(path, "preference"), limit)
    pairs = PreferenceDataset(rows, tok, max_len, "truncate_left", str(path))
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs.items[i][0]), len(pairs.items[i][1])))
    collate = partial(collate_pairs, pad_id=tok.pad_id)
    loader = DataLoader(Subset(pairs, order), batch_size=batch_size, collate_fn=collate)
    return loader, [pairs.tasks[i] for i in order]


@torch.no_grad()
def preference_accuracy(model: GPT, batches, tasks: list[str] | None = None) -> dict[str, float]:
    """Preference accuracy of a policy: the fraction of held-out pairs whose chosen response has a higher
    summed log-probability (response tokens and EOS, nats) than the rejected one, overall and per task (the
    ``task`` of each pair, in loader order), each with its Wilson 95% interval (:func:`proportion`).

    ``batches``: an iterable of :func:`~llmstages.data.datasets.collate_pairs` batches (e.g. a DataLoader over a
    :class:`~llmstages.data.datasets.PreferenceDataset`, not shuffled).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    for batch in batches:
        chosen, rejected = pair_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        hits += (chosen > rejected).tolist()
    model.train(was_training)
    return {**proportion("preference_accuracy", hits), **(per_task("preference_accuracy", hits, tasks) if tasks else {})}



def probe_answers(model: GPT, tok, prompts: list[str], max_new_tokens: int,
                  chat: bool) -> tuple[list[str], list[Generation]]:
    """Greedy answers to the probe prompts (``conf/probes/``) as text, and the generations, whose
    ``tokens``/``attention_mask`` a reward model can score (see :func:`probe_rewards`).

    ``chat``: each prompt is one user turn in the chat template (SFT, RLHF); else a plain text prefix to
    continue (a pretrained model). Prompts are cut from the left to leave room for at least one new token; when
    the longest one leaves less room than ``max_new_tokens``, each prompt is answered on its own, so that it
    does not shorten the others' answers.
    """
    if not prompts:
        return [], []
    keep = model.cfg.max_seq_len - 1
    ids = [(tok.encode_prompt(p) if chat else tok.encode(p) or [tok.bos_id])[-keep:] for p in prompts]
    batches = [ids] if max(map(len, ids)) + max_new_tokens <= model.cfg.max_seq_len else [[i] for i in ids]
    gens = [generate(model, b, max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0) for b in batches]
    return [tok.decode(r.tolist()) for g in gens for r in g.responses], gens


def probe_rewards(model: GPT, head: ScalarHead, gens: list[Generation]) -> list[float] | None:
    """Reward-model score of each probe answer (prompt + response), or ``None`` without probes."""
    if not gens:
        return None
    device = next(model.parameters()).device
    return [s for g in gens for s in
            reward_scores(model, head, g.tokens.to(device), g.attention_mask.to(device)).tolist()]
