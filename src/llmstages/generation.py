"""Batched sampling from a :class:`~llmstages.model.GPT` with a KV cache.

Prompts of different lengths are left-padded; the attention mask hides padding keys and the position
ids are taken from the mask, so a prompt's continuation does not depend on its neighbours' lengths.
Each row stops at its first EOS; finished rows are dropped from the batch (and the KV cache) once a
quarter of the running rows have finished, and the loop ends when all rows have stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import GPT, KVCache


@dataclass
class Generation:
    """Result of :func:`generate`.

    Attributes:
        tokens: ``(B, P + N)`` left-padded prompt then response ids (response padded with ``pad_id``).
        prompt_len: ``P``, the padded prompt length; the response is ``tokens[:, P:]``.
        attention_mask: ``(B, P + N)`` 1 on real prompt tokens and on response tokens up to and incl. EOS.
        response_mask: ``(B, N)`` 1 on generated tokens up to and including EOS.
        finished: ``(B,)`` True where the response ended with EOS.
    """

    tokens: torch.Tensor
    prompt_len: int
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def responses(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to ``(B, P)`` tokens and a ``(B, P)`` mask (1 on real tokens)."""
    P = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return tokens.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, T)``: 0 at each row's first real token, counting real tokens; padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type`` (e.g. under Lightning's bf16-mixed), else None."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):  # torch < 2.4 has per-device functions only
        return None


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next ids ``(B,)`` from logits ``(B, V)``; ``temperature == 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Sample up to ``max_new_tokens`` for each prompt (lists of ids), all in one batch.

    ``temperature=0`` is greedy decoding. Runs under ``torch.inference_mode``. When the longest prompt plus
    ``max_new_tokens`` exceeds ``model.cfg.max_seq_len``, fewer tokens are generated (down to none).
    ``on_token`` (for streaming) is called after each step with that step's ids ``(B,)``, ``pad_id`` in rows
    that had already finished.

    Raises:
        ValueError: if a prompt is empty.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt")
    device = next(model.parameters()).device
    tokens, mask = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    if P + max_new_tokens > model.cfg.max_seq_len:
        max_new_tokens = max(0, model.cfg.max_seq_len - P)
    dtype = _autocast_dtype(device.type) or next(model.parameters()).dtype  # the dtype keys/values come out in
    cache = KVCache(model.cfg, B, P + max_new_tokens, device, dtype)
    pos = positions_from_mask(mask)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    prefill_mask = causal[None] & mask.bool()[:, None, :]
    prefill_mask |= torch.eye(P, dtype=torch.bool, device=device)[None]  # padding rows attend to themselves
    was_training = model.training
    model.eval()
    logits = model(tokens, positions=pos, attn_mask=prefill_mask, cache=cache)[:, -1]
    key_mask = torch.cat([mask.bool(), torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    next_pos = pos[:, -1] + 1
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    resp_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # batch rows still in the cache ("active"), in cache order
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per active row: EOS emitted
    for t in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[rows, t] = nxt
        if on_token is not None:
            on_token(out[:, t])
        resp_mask[rows, t] = (~done).long()
        done |= nxt == eos_id
        n_done = int(done.sum())  # the loop's one host synchronisation per token
        if n_done == len(rows) or t == max_new_tokens - 1:
            finished[rows] = done
            out, resp_mask = out[:, : t + 1], resp_mask[:, : t + 1]
            break
        if n_done * 4 >= len(rows):  # drop finished rows so they stop costing compute
            finished[rows[done]] = True
            keep = ~done
            rows, nxt, next_pos, key_mask, done = rows[keep], nxt[keep], next_pos[keep], key_mask[keep], done[keep]
            cache.select(keep)
        key_mask[:, P + t] = True
        logits = model(nxt[:, None], positions=next_pos[:, None], attn_mask=key_mask[:, None, : P + t + 1],
                       cache=cache)[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    full = torch.cat([tokens, out], 1)
    return Generation(full, P, torch.cat([mask, resp_mask], 1), resp_mask, finished)
