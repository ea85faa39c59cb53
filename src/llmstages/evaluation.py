"""Held-out evaluation by generation: exact match, response length, EOS rate, reward-model score."""

from __future__ import annotations

import random

import torch

from .generation import Generation, generate, positions_from_mask
from .model import GPT, ScalarHead, last_token_index


def eval_subset(rows: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """A fixed, seeded sample of at most ``limit`` rows (``0`` = all), kept in file order."""
    if not limit or len(rows) <= limit:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), limit))
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


def answer_metrics(rows: list[dict], responses: list[str], gens: list[Generation]) -> dict[str, float]:
    """Exact match overall and on arithmetic, mean response length (tokens) and fraction ending in EOS."""
    hits = [normalise(r) == normalise(row["answer"]) for row, r in zip(rows, responses)]
    arith = [h for h, row in zip(hits, rows) if row.get("task") == "arithmetic"]
    lengths = torch.cat([g.response_mask.sum(1).float() for g in gens])
    finished = torch.cat([g.finished.float() for g in gens])
    return {
        "exact_match": sum(hits) / max(1, len(hits)),
        "exact_match_arithmetic": sum(arith) / max(1, len(arith)),
        "mean_response_tokens": float(lengths.mean()),
        "eos_fraction": float(finished.mean()),
    }



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
