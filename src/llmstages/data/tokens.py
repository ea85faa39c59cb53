"""Token files: the corpus's documents tokenized into ``train.bin`` / ``val.bin`` (flat little-endian token ids,
each document followed by EOS), split by document with a seeded hash, with per-split totals and the training
unigram counts.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmstages.data.corpus import Piece, _utf8_len

if TYPE_CHECKING:
    import tokenizers

MAX_NAMES = 10_000  #: document names kept per split in :class:`SplitStats`


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian dtype of token files: uint16 if ``vocab_size <= 65536`` else uint32.

    Raises:
        ValueError: ``vocab_size`` < 1 or > 2**32.
    """
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..2**32")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_val_doc(doc: int, seed: int, fraction: float) -> bool:
    """Whether document ``doc`` (0-based) belongs to the validation split.

    Document 0 always does (validation is never empty); any other one when a seeded hash of ``(seed, doc)``
    (blake2b, 8 bytes, as a number in [0, 1)) is below ``fraction``. Depends on nothing else, so every pass
    over the corpus agrees.
    """
    if doc == 0:
        return True
    h = hashlib.blake2b(f"{seed}:{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass
class SplitStats:
    """Totals of one split: documents, tokens (EOS included), text bytes (UTF-8), first document names."""

    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    names: list[str] = field(default_factory=list)  # the first MAX_NAMES documents only


@dataclass
class TokenizeStats:
    """What :func:`write_token_files` wrote: per-split totals, train unigram counts, wall seconds."""

    train: SplitStats
    val: SplitStats
    counts: np.ndarray  # int64 bincount of the train token file, length vocab_size
    seconds: float


def _chunks(pieces: Iterable[Piece], chunk_bytes: int) -> Iterator[list[tuple[Piece, int]]]:
    """Consecutive ``(piece, utf8_bytes)`` lists of at least ``chunk_bytes`` text bytes (the last may be less)."""
    chunk: list[tuple[Piece, int]] = []
    size = 0
    for p in pieces:
        n = _utf8_len(p.text)
        chunk.append((p, n))
        size += n
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoder(tok: tokenizers.Tokenizer):
    """``encode_batch_fast`` (no offsets) when this ``tokenizers`` has it, else ``encode_batch``."""
    return getattr(tok, "encode_batch_fast", None) or tok.encode_batch


def _progress(enabled: bool, total_bytes: int | None):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[docs]:,} docs"),
                    DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def write_token_files(pieces: Iterable[Piece], tok: tokenizers.Tokenizer, eos_id: int, train_path: Path,
                      val_path: Path, *, seed: int, val_fraction: float, vocab_size: int,
                      chunk_bytes: int = 8 << 20, progress: bool = True,
                      total_bytes: int | None = None) -> TokenizeStats:
    """Tokenize ``pieces`` into little-endian token files, every document followed by ``eos_id``.

    Documents go to ``val_path`` when :func:`is_val_doc` (``seed``, ``val_fraction``), else to ``train_path``;
    both files are created (truncated) and appended to chunk by chunk, so memory is bounded by ``chunk_bytes``
    whatever the corpus size: about 40 bytes per text byte of a chunk while it is encoded (the ``Encoding``
    objects and the id lists; ~330 MB for the default 8 MiB). Each chunk is encoded
    with one ``encode_batch_fast`` call (``add_special_tokens=False``), which ``tokenizers`` spreads over all
    CPU cores (unless ``TOKENIZERS_PARALLELISM=false``). Reading, parsing and turning ids into arrays stay on
    one core (a reader thread overlapping them with encoding was measured no faster on 2 cores).

    Args:
        pieces: e.g. :func:`iter_corpus`; pieces of a document must be consecutive.
        tok: the tokenizer; encoded as configured (e.g. its ``encode_special_tokens`` flag is honoured).
        eos_id: id appended after each document's last piece.
        seed, val_fraction: validation split by document (:func:`is_val_doc`), ``0 <= val_fraction < 1``.
        vocab_size: all ids (and ``eos_id``) must be below it; sets the dtype (:func:`token_dtype`).
        chunk_bytes: text bytes encoded per batch.
        progress: show a rich progress bar (documents, bytes, bytes/s).
        total_bytes: expected text bytes (progress bar total), if known.

    Returns:
        :class:`TokenizeStats`; ``counts`` is the bincount of everything in the train file (EOS included).

    Raises:
        ValueError: bad ``val_fraction``/``eos_id``/``vocab_size``, a token id >= ``vocab_size``, or no
            document in the train split ("need at least 2 documents") or none at all ("no text"); errors of
            ``pieces`` pass through.
    """
    dtype = token_dtype(vocab_size)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} must be in 0..vocab_size-1={vocab_size - 1}")
    encode = _encoder(tok)
    start = time.perf_counter()
    stats = {False: SplitStats(), True: SplitStats()}
    counts = np.zeros(vocab_size, dtype=np.int64)
    eos = [eos_id]
    in_val, val_of = -1, False  # split of the current document (a document's pieces are consecutive)
    with open(train_path, "wb") as ftrain, open(val_path, "wb") as fval, _progress(progress, total_bytes) as bar:
        task = bar.add_task("tokenizing", total=total_bytes, docs=0)
        done_bytes = done_docs = 0
        for chunk in _chunks(pieces, chunk_bytes):
            encs = encode([p.text for p, _ in chunk], add_special_tokens=False)
            ids: dict[bool, list[list[int]]] = {False: [], True: []}
            for (p, n), enc in zip(chunk, encs):
                if p.doc != in_val:
                    in_val, val_of = p.doc, is_val_doc(p.doc, seed, val_fraction)
                s, out = stats[val_of], ids[val_of]
                e = enc.ids
                out.append(e)
                s.tokens += len(e)
                s.bytes += n
                done_bytes += n
                if p.last:
                    out.append(eos)
                    s.tokens += 1
                    s.docs += 1
                    done_docs += 1
                    if len(s.names) < MAX_NAMES:
                        s.names.append(p.name)
            del encs
            for is_val, f in ((False, ftrain), (True, fval)):
                n = sum(map(len, ids[is_val]))
                if not n:
                    continue
                try:
                    arr = np.fromiter(itertools.chain.from_iterable(ids[is_val]), dtype=dtype, count=n)
                except OverflowError as e:
                    raise ValueError(f"a token id does not fit {dtype} (vocab_size={vocab_size})") from e
                if (top := int(arr.max())) >= vocab_size:
                    raise ValueError(f"token id {top} >= vocab_size={vocab_size}")
                if not is_val:
                    counts += np.bincount(arr, minlength=vocab_size)
                arr.tofile(f)
            bar.update(task, completed=done_bytes, docs=done_docs)
        bar.update(task, total=done_bytes, completed=done_bytes)
    train, val = stats[False], stats[True]
    if train.docs + val.docs == 0:
        raise ValueError("the corpus has no text: every document in it is empty or whitespace only")
    if train.docs == 0:
        names = ", ".join([*train.names, *val.names][:3])
        raise ValueError(f"need at least 2 documents for a train/validation split, got {train.docs + val.docs} "
                         f"({names}; {val.docs} went to validation, val_fraction={val_fraction}). Each file (or "
                         "row) is one document: to split a long text file into documents of about 50 kB at line ends, "
                         "set data.max_doc_mb=0.05")
    return TokenizeStats(train=train, val=val, counts=counts, seconds=time.perf_counter() - start)
