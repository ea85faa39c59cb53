"""Datasets and collators shared by the training stages.

Everything here reads rows the ``data`` stage wrote (token files and canonical JSONL sets, see
:mod:`llmstages.data.formats`) and yields plain tensors; nothing reads the config tree.

Over-long examples follow a ``long_prompt`` policy (:data:`LONG_PROMPT_POLICIES`): ``truncate_left`` cuts the
prompt from the left (after ``<bos>`` and the first role token) so that the response still fits, and cuts a
response that alone is too long on the right (at least one response token is always kept); ``drop`` drops the
example. Either way each kept example has at least one supervised token, so no batch can give a NaN or a
fake 0.0 loss; what was truncated or dropped is counted in the dataset's :class:`EncodeStats`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .jsonio import read_jsonl  # noqa: F401  (re-exported for the stages)

PROMPT_FIELDS = ("prompt", "answer")
LONG_PROMPT_POLICIES = ("truncate_left", "drop")


class TokenWindows(Dataset):
    """Random fixed-length windows of a token file, for next-token prediction.

    Item ``i`` is ``(x, y)``, both ``(seq_len,)`` int64, with ``y`` = ``x`` shifted by one token. Window
    offsets are a deterministic function of ``(seed, i)`` (a resumed run goes on from its loader's saved
    position: see the pretrain stage). ``dtype`` is the file's (``meta.json["dtype"]``: uint16 or uint32).

    Raises:
        ValueError: if the file holds fewer than ``seq_len + 1`` tokens.
    """

    def __init__(self, path: str | Path, seq_len: int, num_samples: int, seed: int = 0, dtype: str = "uint16") -> None:
        self.tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.seq_len = seq_len
        rng = np.random.default_rng(seed)
        self.offsets = rng.integers(0, len(self.tokens) - seq_len - 1, size=num_samples)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = int(self.offsets[i])
        chunk = torch.from_numpy(self.tokens[o: o + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


@dataclass
class EncodeStats:
    """What encoding a row set did: rows read, kept, truncated, dropped per reason, tokens kept."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0

    def summary(self) -> dict:
        return {"rows_read": self.read, "rows_kept": self.kept, "rows_truncated": self.truncated,
                **{f"rows_dropped_{k}": v for k, v in sorted(self.dropped.items())}, "tokens": self.tokens}

    def require_rows(self, what: str) -> None:
        """Raise ``ValueError`` with the per-reason drop counts if no row was kept."""
        if not self.kept:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "no rows"
            raise ValueError(f"{what}: all {self.read} rows were dropped ({reasons})")


def fit_length(ctx: list[int], ctx_mask: list[int], responses: list[list[int]], max_len: int,
               policy: str) -> tuple[list[int], list[int], list[list[int]], bool] | None:
    """Fit ``ctx + response`` (for every response alike) into ``max_len`` tokens.

    ``ctx`` is everything before the final response (``<bos><role>...<|assistant|>``; ``ctx_mask`` its loss
    mask, 1 on earlier assistant turns), each response its ids including the closing EOS. With
    ``truncate_left``, the prompt keeps up to ``max(3, max_len // 2)`` tokens (more when the response is short):
    it is cut from the left after ``<bos>`` and the first role token; responses longer than the rest are cut on
    the right (their EOS lost). All responses share the same prompt cut.

    Returns:
        ``(ctx, ctx_mask, responses, truncated)``, or ``None`` when the example must be dropped (``policy`` is
        ``"drop"`` and it is too long, or not even one response token fits in ``max_len``).
    """
    longest = max(len(r) for r in responses)
    if len(ctx) + longest <= max_len:
        return ctx, ctx_mask, responses, False
    keep = min(longest, max_len - min(len(ctx), max(3, max_len // 2)))  # response tokens kept
    budget = max_len - keep  # prompt tokens kept: at least <bos>, the first role token and <|assistant|>
    if policy == "drop" or keep < 1 or budget < 3:
        return None
    if len(ctx) > budget:
        cut = len(ctx) - (budget - 2)
        ctx, ctx_mask = ctx[:2] + ctx[cut:], ctx_mask[:2] + ctx_mask[cut:]
    return ctx, ctx_mask, [r[:keep] for r in responses], True


def _split_last_turn(ids: list[int], mask: list[int]) -> int:
    """Index where the final assistant response starts (after the last 0 -> 1 step of the loss mask)."""
    return next(i for i in range(len(mask) - 1, 0, -1) if mask[i] and not mask[i - 1])


class SFTDataset(Dataset):
    """Conversations ``{"messages": [...]}`` rendered with the chat template (loss on assistant turns only).

    Item: ``(input_ids, loss_mask)`` lists, or with ``packing`` ``(input_ids, loss_mask, segment_ids)``: several
    examples in order in one sequence of at most ``max_len`` tokens, ``segment_ids`` numbering them from 1.
    ``stats`` counts what was read, truncated and dropped (reason ``too_long``).

    Raises:
        ValueError: ``long_prompt`` is not a policy, or every row was dropped (with the counts).
    """

    def __init__(self, rows: list[dict], tok, max_len: int, long_prompt: str = "truncate_left",
                 packing: bool = False, source: str = "SFT set") -> None:
        if long_prompt not in LONG_PROMPT_POLICIES:
            raise ValueError(f"long_prompt={long_prompt!r}: expected one of {list(LONG_PROMPT_POLICIES)}")
        self.stats, items = EncodeStats(read=len(rows)), []
        for r in rows:
            ids, mask = tok.encode_chat(r["messages"])
            s = _split_last_turn(ids, mask)
            fit = fit_length(ids[:s], mask[:s], [ids[s:]], max_len, long_prompt)
            if fit is None:
                self.stats.dropped["too_long"] += 1
                continue
            ctx, ctx_mask, (resp,), truncated = fit
            self.stats.truncated += truncated
            items.append((ctx + resp, ctx_mask + [1] * len(resp)))
        self.stats.kept, self.stats.tokens = len(items), sum(len(i[0]) for i in items)
        self.stats.require_rows(f"{source} (max_len={max_len}, long_prompt={long_prompt})")
        self.items = pack(items, max_len) if packing else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def pack(items: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy in-order packing: consecutive examples share a sequence while the total stays <= ``max_len``.

    Returns ``(ids, loss_mask, segment_ids)`` per packed sequence; each example keeps its own loss mask.
    """
    packs, cur = [], ([], [], [])
    for ids, mask in items:
        if cur[0] and len(cur[0]) + len(ids) > max_len:
            packs.append(cur)
            cur = ([], [], [])
        seg = (cur[2][-1] if cur[2] else 0) + 1
        cur[0].extend(ids), cur[1].extend(mask), cur[2].extend([seg] * len(ids))
    if cur[0]:
        packs.append(cur)
    return packs


def _pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


def packed_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask ``(B, T, T)`` and position ids ``(B, T)`` for packed rows with ``segments`` ``(B, T)``.

    A token attends causally to earlier tokens of its own example only (segment 0 = padding attends to itself);
    positions restart at 0 for each example, so a packed example is computed exactly as it would be alone.
    """
    B, T = segments.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn = causal[None] & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    attn |= torch.eye(T, dtype=torch.bool)[None]
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    idx = torch.arange(T).expand(B, T)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return attn, idx - first


def collate_sft(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """``inputs``/``targets``/``loss_mask`` ``(B, T-1)``: targets are inputs shifted left; padding (``pad_id``,
    which may equal EOS) is masked by length, never by id. Packed items also give ``positions`` ``(B, T-1)`` and
    ``attn_mask`` ``(B, T-1, T-1)`` (see :func:`packed_attention`)."""
    ids = _pad_right([b[0] for b in batch], pad_id)
    mask = _pad_right([b[1] for b in batch], 0)
    out = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask[:, 1:]}
    if len(batch[0]) == 3:
        out["attn_mask"], out["positions"] = packed_attention(_pad_right([b[2] for b in batch], 0)[:, :-1])
    return out


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin packing of items of ``lengths`` into as few rows of ``capacity`` as first-fit decreasing finds (each
    item into the first row it fits, longest first). Returns the item indices of each row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _packed_rows(seqs: list[list[int]], capacity: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """``seqs`` packed (:func:`first_fit_decreasing`): each row's item indices, concatenated ids and segment
    ids (1, 2, ... per item)."""
    bins = first_fit_decreasing([len(x) for x in seqs], capacity)
    ids = [[t for i in b for t in seqs[i]] for b in bins]
    segs = [[k + 1 for k, i in enumerate(b) for _ in seqs[i]] for b in bins]
    return bins, ids, segs


def collate_padding_free(batch, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """The ``(input_ids, loss_mask)`` examples of one batch packed into rows of at most ``max_len`` tokens
    (:func:`first_fit_decreasing`), each example attending only to itself with its own positions
    (padding-free batching, as TRL's ``padding_free``): the same examples and the same loss as
    :func:`collate_sft`'s padded batch, without computing the padding. Returns :func:`collate_sft`'s keys with
    ``positions`` and ``attn_mask``; ``B`` is the number of rows."""
    bins, ids, segs = _packed_rows([b[0] for b in batch], max_len)
    masks = [[m for i in b for m in batch[i][1]] for b in bins]
    return collate_sft(list(zip(ids, masks, segs)), pad_id)


class PreferenceDataset(Dataset):
    """Chosen/rejected pairs ``{"prompt": [messages], "chosen": str, "rejected": str}``, each rendered as a whole
    chat: item ``(chosen_ids, rejected_ids, chosen_loss_mask, rejected_loss_mask)``, the masks 1 on the final
    response tokens and EOS. Both sides keep the same (possibly left-truncated) prompt. ``stats`` as in
    :class:`SFTDataset`; ``tasks`` holds each kept pair's ``task`` (``"user"`` where the row has none).

    Raises:
        ValueError: ``long_prompt`` is not a policy, or every pair was dropped (with the counts).
    """

    def __init__(self, rows: list[dict], tok, max_len: int, long_prompt: str = "truncate_left",
                 source: str = "preference set") -> None:
        if long_prompt not in LONG_PROMPT_POLICIES:
            raise ValueError(f"long_prompt={long_prompt!r}: expected one of {list(LONG_PROMPT_POLICIES)}")
        self.stats, self.items, self.tasks = EncodeStats(read=len(rows)), [], []
        for r in rows:
            prompt = tok.encode_prompt(r["prompt"])
            resps = [tok.encode_response(r["prompt"], r[k]) for k in ("chosen", "rejected")]
            fit = fit_length(prompt, [0] * len(prompt), resps, max_len, long_prompt)
            if fit is None:
                self.stats.dropped["too_long"] += 1
                continue
            ctx, ctx_mask, (c, j), truncated = fit
            self.stats.truncated += truncated
            self.items.append((ctx + c, ctx + j, ctx_mask + [1] * len(c), ctx_mask + [1] * len(j)))
            self.tasks.append(r.get("task") or "user")
        self.stats.kept = len(self.items)
        self.stats.tokens = sum(len(i[0]) + len(i[1]) for i in self.items)
        self.stats.require_rows(f"{source} (max_len={max_len}, long_prompt={long_prompt})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_pairs(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded with ``pad_id``, all ``(2B, T)``: ``tokens``, ``mask`` (1 on
    real tokens) and ``loss_mask`` (1 on response tokens)."""
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    return {"tokens": _pad_right(seqs, pad_id), "mask": _pad_right([[1] * len(s) for s in seqs], 0),
            "loss_mask": _pad_right([b[2] for b in batch] + [b[3] for b in batch], 0)}


def collate_pairs_padding_free(batch, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """:func:`collate_pairs`' ``2B`` sequences (chosen then rejected) packed into ``R`` rows of at most
    ``max_len`` tokens (:func:`first_fit_decreasing`), each attending only to itself: ``tokens`` ``(R, T)``,
    ``attn_mask`` ``(R, T, T)``, ``positions`` ``(R, T)`` and ``last`` ``(2B, 2)``, the (row, column) of each
    sequence's last token, in :func:`collate_pairs`' order."""
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    bins, ids, segs = _packed_rows(seqs, max_len)
    last = [None] * len(seqs)
    for r, b in enumerate(bins):
        end = 0
        for i in b:
            end += len(seqs[i])
            last[i] = (r, end - 1)
    attn, pos = packed_attention(_pad_right(segs, 0))
    return {"tokens": _pad_right(ids, pad_id), "attn_mask": attn, "positions": pos,
            "last": torch.tensor(last, dtype=torch.long)}


class PromptDataset(Dataset):
    """RL prompts: item ``{"prompt_ids": list[int], "answer": str, "task": str, "prompt": str}``."""

    def __init__(self, rows: list[dict], tok, max_prompt_len: int) -> None:
        self.items = []
        for r in rows:
            ids = tok.encode_prompt(r["prompt"])
            if len(ids) <= max_prompt_len:
                self.items.append({"prompt_ids": ids, "answer": r.get("answer", ""), "task": r.get("task", ""),
                                   "prompt": r["prompt"]})
        if not self.items:
            raise ValueError("prompt set is empty after encoding")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class ShuffledPasses(Sampler[int]):
    """The indices a training run reads: successive passes of ``n`` draws each over a dataset of ``n`` items,
    cut after ``num_samples`` indices per process; process ``rank`` of ``world_size`` takes every
    ``world_size``-th index of that stream.

    Pass ``p`` draws from a generator seeded with ``seed + p``: a permutation (``torch.randperm(n)``), or, with
    ``weights`` ``(n,)``, ``n`` draws with replacement in proportion to them (``torch.multinomial``; e.g.
    :func:`task_weights`, so that every task is drawn equally often in expectation).

    The order depends on ``(seed, position)`` alone, and one sampler spans the whole run (Lightning sees one
    epoch of ``max_steps`` batches; a pass over the data may end inside a batch), so a resumed run fast-forwards
    to its position and reads what the uninterrupted run would, including across the end of a pass. Under DDP
    the W processes' batches of a step are together the batch of ``W * batch_size`` that one process reads.

    Raises:
        ValueError: if ``weights`` does not hold ``n`` non-negative values with a positive sum.
    """

    def __init__(self, n: int, num_samples: int, seed: int, world_size: int = 1, rank: int = 0,
                 weights: torch.Tensor | None = None) -> None:
        if weights is not None and (weights.shape != (n,) or bool((weights < 0).any()) or not float(weights.sum()) > 0):
            raise ValueError(f"sampling weights must be {n} non-negative values with a positive sum, got shape "
                             f"{tuple(weights.shape)}")
        self.n, self.num_samples, self.seed, self.world_size, self.rank = n, num_samples, seed, world_size, rank
        self.weights = None if weights is None else weights.double()

    def _pass(self, p: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + p)
        if self.weights is None:
            return torch.randperm(self.n, generator=g).tolist()
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()

    def __iter__(self):
        produced, i, p = 0, 0, 0  # indices this process yielded; position in the global stream; pass
        while produced < self.num_samples:
            for idx in self._pass(p):
                if i % self.world_size == self.rank:
                    yield idx
                    produced += 1
                    if produced == self.num_samples:
                        return
                i += 1
            p += 1

    def __len__(self) -> int:
        return self.num_samples


def shuffled_loader(dataset: Dataset, steps: int, seed: int, world_size: int = 1, rank: int = 0, *, batch_size: int,
                    weights: torch.Tensor | None = None, **kwargs) -> StatefulDataLoader:
    """The training batches of a run of ``steps`` micro-batches: :class:`ShuffledPasses` over ``dataset`` (drawn
    in proportion to ``weights`` when given) in a ``StatefulDataLoader``, whose position is saved in each
    checkpoint (a plain DataLoader restarts its epoch on resume, and a ``RandomSampler`` draws its order from the
    global RNG, which a resumed process does not have). ``kwargs`` go to the loader (``collate_fn``,
    ``num_workers``)."""
    sampler = ShuffledPasses(len(dataset), steps * batch_size, seed, world_size, rank, weights)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def heldout_loader(dataset: Dataset, **kwargs) -> DataLoader:
    """The held-out batches in one fixed random order (the same for every run and seed): the held-out files are
    grouped by task, so the first ``trainer.limit_val_batches`` batches of a validation during training would
    otherwise score the first task only. A validation over every batch sees every item once, as in file order.
    ``kwargs`` go to the loader (``batch_size``, ``collate_fn``, ``num_workers``)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return DataLoader(dataset, sampler=order, **kwargs)


def task_weights(tasks: list[str]) -> torch.Tensor:
    """Sampling weights ``(len(tasks),)`` under which every task is drawn equally often in expectation (item
    weight ``1 / count(its task)``): a task with few rows (``explain``) is not drowned by a large one
    (``arithmetic``). For :func:`shuffled_loader`."""
    counts = Counter(tasks)
    return torch.tensor([1.0 / counts[t] for t in tasks], dtype=torch.double)


def collate_prompts(batch) -> list[dict]:
    return list(batch)

