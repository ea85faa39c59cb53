"""Pretraining corpora read as a stream and tokenized into token files with bounded memory.

Formats (``fmt``): ``text`` (one file = one document), ``jsonl`` (one row = one document, text in a column;
a ``.json`` file holding one JSON array is also accepted), ``parquet`` (one row = one document), ``hf``
(a ``datasets`` ``save_to_disk`` folder, or data files loaded with ``datasets.load_dataset``) and ``auto``
(``text`` / ``jsonl`` / ``parquet`` chosen per file by its extension).

:func:`iter_corpus` yields :class:`Piece` s: a document is one or more consecutive pieces, the last one marked
``last=True``. Large text files are cut into pieces of about ``piece_bytes`` at places where a byte-level BPE
with a GPT-2-style regex pre-tokenizer (+ individual digits) splits anyway, so encoding the pieces separately
gives exactly the ids of encoding the whole file. :func:`write_token_files` encodes the pieces a chunk at a time
(``tokenizers`` spreads a batch over all CPU cores) and appends the ids to ``train``/``val`` token files.

``datasets`` and ``pyarrow`` are imported only when a parquet or hf corpus is read.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmstages.data.jsonio import iter_rows, require_fields

if TYPE_CHECKING:
    import tokenizers

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
               ".txt": "text"}
MAX_NAMES = 10_000  #: document names kept per split in :class:`SplitStats`


@dataclass(frozen=True)
class Piece:
    """A piece of one document's text; the document's EOS goes after the piece with ``last=True``.

    Attributes:
        doc: 0-based document index in corpus order (dropped documents take no index).
        name: where the document comes from: ``"path"`` (text), ``"path:lineno"`` (JSONL), ``"path[i]"``
            (JSON array), ``"path:row i"`` (parquet, 0-based), ``"hf:<pattern>[i]"`` (hf, 0-based).
        text: the text of this piece.
        last: True on the document's last piece.
    """

    doc: int
    name: str
    text: str
    last: bool


# --------------------------------------------------------------------------- files
def _walk_files(root: Path) -> list[Path]:
    """Files below ``root`` (recursive), sorted by path, skipping hidden files and folders (name starts with ".")."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        out += [Path(d, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
    return sorted(out, key=str)


def find_files(patterns: list[str]) -> list[Path]:
    """Files matched by ``patterns``: pattern order, each pattern's matches sorted, duplicates removed.

    Each pattern is a file, a folder (all files below it, recursively, hidden files and folders skipped) or a
    recursive glob (``**`` matches any depth; like a shell, ``*`` does not match hidden names). A file reached
    twice (same real path) is kept at its first place only.

    Raises:
        FileNotFoundError: naming the first pattern that matches no file.
    """
    import glob

    seen: set[str] = set()
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = _walk_files(p)
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(pat), recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"corpus pattern matched no files: {str(pat)!r}")
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out


def corpus_bytes(patterns: list[str], fmt: str = "auto") -> int | None:
    """Total size in bytes of the files matched by ``patterns`` (None for ``fmt="hf"``), for a progress total.

    For JSONL and parquet this is an upper bound-ish estimate of the text bytes (it includes the JSON syntax
    and the other columns; parquet is compressed).

    Raises:
        FileNotFoundError: a pattern matches no file.
    """
    if fmt == "hf":
        return None
    return sum(f.stat().st_size for f in find_files(patterns))


# --------------------------------------------------------------------------- text files
def _decoded_blocks(path: Path, block_bytes: int) -> Iterator[str]:
    """The UTF-8 text of ``path`` in blocks of about ``block_bytes`` bytes (a character is never split).

    Raises:
        ValueError: ``path:lineno`` of the first bytes that are not valid UTF-8.
    """
    carry = b""
    line, offset = 1, 0  # line of the first byte of `carry + block`; file offset of that byte
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            buf = carry + block
            try:
                text, carry = buf.decode("utf-8"), b""
            except UnicodeDecodeError as e:
                if block and e.reason == "unexpected end of data":  # a character cut by the block boundary
                    text, carry = buf[: e.start].decode("utf-8"), buf[e.start :]
                else:
                    at = line + buf.count(b"\n", 0, e.start)
                    raise ValueError(f"{path}:{at}: not valid UTF-8 ({e.reason} at byte {offset + e.start} "
                                     f"of the file)") from e
            line += text.count("\n")
            offset += len(buf) - len(carry)
            if text:
                yield text
            if not block:
                return


_NEWLINE_CUT = re.compile(r"\S\n\S")  # searched in the reversed text
_SPACE_CUT = re.compile(r"[^\W\d_][ \t\n\r\x0b\x0c]")  # a letter after an ASCII whitespace char, reversed


def _last_cut(s: str) -> int:
    """Index in ``s`` of the last safe place to start a new piece, or -1 if there is none.

    Safe means: a byte-level BPE whose pre-tokenizer is individual digits + the GPT-2 regex
    (``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``) puts a pre-token boundary there
    whatever the text around it, so ``encode(a) + encode(b) == encode(a + b)`` for ``a, b = s[:i], s[i:]``.

    1. Right after a ``"\\n"`` that has non-whitespace on both sides: that newline is always a pre-token of
       its own (preferred: pieces end at line ends).
    2. Else right before an ASCII whitespace character that is followed by a letter: the whitespace run
       before it is one pre-token (``\\s+(?!\\S)`` stops one short of the letter) and that character starts
       the next one (with the letter when it is a space). Not after a run followed by a digit or punctuation:
       a digit is split off by the Digits pre-tokenizer, so there the whole run is a single pre-token.

    A cut right after any newline followed by non-whitespace would not be safe: in ``"x \\nA"`` the regex
    gives ``" "``, ``"\\n"``, but ``"x \\n"`` alone gives ``" \\n"``; likewise ``"\\n\\n"`` before a paragraph.
    """
    rev = s[::-1]
    m = _NEWLINE_CUT.search(rev)
    if m:
        return len(s) - 1 - m.start()
    pos = 0
    while (m := _SPACE_CUT.search(rev, pos)) is not None:
        if rev[m.start()].isalpha():  # [^\W\d_] also matches non-decimal numerics such as "½"
            return len(s) - 2 - m.start()
        pos = m.start() + 1
    return -1


def _text_pieces(path: Path, piece_bytes: int) -> Iterator[tuple[str, bool]]:
    """``(text, last)`` pieces of a UTF-8 text file, each about ``piece_bytes`` bytes, cut by :func:`_last_cut`.

    Yields nothing for a file that is empty or whitespace only. Memory: about two pieces, unless the file has
    long stretches without a safe cut (then a piece grows until the next one).

    Raises:
        ValueError: ``path:lineno`` of bytes that are not valid UTF-8.
    """
    parts: list[str] = []  # text read but not yet yielded (without `tail`)
    tail = ""  # last character read, held back: a cut is only decided with the character after it known
    yielded = False
    for text in _decoded_blocks(path, piece_bytes):
        window = tail + text
        tail = window[-1]
        i = _last_cut(window)
        if i > 0 or (i == 0 and parts):
            parts.append(window[:i])
            yield "".join(parts), False
            yielded = True
            parts = [window[i:-1]]
        else:
            parts.append(window[:-1])
    rest = "".join(parts) + tail
    if yielded or rest.strip():
        yield rest, True


# --------------------------------------------------------------------------- row files
def _jsonl_rows(path: Path, column: str) -> Iterator[tuple[str, str | None]]:
    """``("path:lineno", text)`` per row of a JSONL file (or a .json array: ``"path[i]"``).

    Raises:
        ValueError: naming ``path:lineno``: bytes that are not UTF-8, invalid JSON, a row that is not an
            object, a row without ``column`` (listing the fields found), a non-string value.
    """
    for where, row in iter_rows(path):
        require_fields(where, row, (column,))
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {column!r} must be a string, got {type(text).__name__}")
        yield where, text


def _batch_rows(avg_row_bytes: float, target_bytes: int) -> int:
    """Rows per batch so that a batch holds about ``target_bytes`` (1..65536)."""
    return int(min(65536, max(1, target_bytes // max(avg_row_bytes, 1.0))))


def _parquet_rows(path: Path, column: str, target_bytes: int) -> Iterator[tuple[str, str | None]]:
    """``("path:row i", text or None)`` per row of a parquet file (i 0-based), read in batches of ~``target_bytes``.

    Raises:
        ValueError: naming the file: no such column (listing the columns found) or not a string column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        schema = pf.schema_arrow
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise ValueError(f"{path}: column {column!r} must hold strings, got {kind}")
        meta = pf.metadata
        j = schema.names.index(column)
        size = sum(meta.row_group(g).column(j).total_uncompressed_size for g in range(meta.num_row_groups))
        rows = _batch_rows(size / max(meta.num_rows, 1), target_bytes)
        i = 0
        for batch in pf.iter_batches(batch_size=rows, columns=[column]):
            for text in batch.column(0).to_pylist():
                yield f"{path}:row {i}", text
                i += 1


def _hf_source(pattern: str) -> tuple[str, object]:
    """Resolve one hf pattern to ``(kind, arg)``: ``("disk", folder)`` or ``(builder, [data files])``.

    Raises:
        FileNotFoundError: the pattern matches nothing.
        ValueError: a data file of an unsupported extension, or files needing different builders.
    """
    p = Path(pattern)
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return "disk", p
    files = find_files([pattern])
    builders = {HF_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders:
        bad = next(f for f in files if f.suffix.lower() not in HF_BUILDERS)
        raise ValueError(f"hf corpus {pattern!r}: unsupported data file {str(bad)!r} "
                         f"(extensions: {sorted(HF_BUILDERS)}, or a save_to_disk folder)")
    if len(builders) > 1:
        raise ValueError(f"hf corpus {pattern!r}: data files of different kinds {sorted(builders)}; "
                         f"give one pattern per kind")
    return builders.pop(), files


def _hf_rows(pattern: str, source: tuple[str, object], column: str, split: str,
             target_bytes: int) -> Iterator[tuple[str, str | None]]:
    """``("hf:<pattern>[i]", text or None)`` per row of a Hugging Face dataset, read in batches (bounded memory).

    ``save_to_disk`` folders are memory-mapped (``datasets.load_from_disk``; a ``DatasetDict`` gives its
    ``split``); data files are streamed (``datasets.load_dataset(builder, data_files, split, streaming=True)``),
    so nothing is copied to the Hugging Face cache. ``HF_DATASETS_OFFLINE=1`` unless set: no network.

    Raises:
        ValueError: naming the dataset: no split ``split`` (listing the splits), no column ``column`` (listing
            the columns found), a value that is neither a string nor null.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    kind, arg = source
    if kind == "disk":
        ds = datasets.load_from_disk(str(arg))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"hf dataset {pattern}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in arg], split=split, streaming=True)
        except ValueError as e:  # e.g. "Bad split: test. Available splits: ['train']"
            raise ValueError(f"hf dataset {pattern}: {e}") from e
    columns = ds.column_names
    if columns is None:  # streamed file whose schema is only known once read
        columns = list(next(iter(ds), {}))
    if column not in columns:
        raise ValueError(f"hf dataset {pattern}: no column {column!r} (columns: {list(columns)})")
    ds = ds.select_columns([column])
    i = 0
    for batch in ds.iter(batch_size=_batch_rows(4096, target_bytes)):
        for text in batch[column]:
            if text is not None and not isinstance(text, str):
                raise ValueError(f"hf dataset {pattern}[{i}]: column {column!r} must hold strings, "
                                 f"got {type(text).__name__}")
            yield f"hf:{pattern}[{i}]", text
            i += 1


# --------------------------------------------------------------------------- corpus
def _utf8_len(text: str) -> int:
    """UTF-8 size of ``text`` in bytes (O(1) for ASCII strings)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


Doc = tuple[str, int, Iterable[tuple[str, bool]]]  # (name, UTF-8 bytes, (text, last) pieces: none = drop)


def _row_docs(rows: Iterable[tuple[str, str | None]]) -> Iterator[Doc]:
    """One single-piece document per row; null or whitespace-only texts give no piece (dropped)."""
    for name, text in rows:
        if text is None or not text.strip():
            yield name, 0, ()
        else:
            yield name, _utf8_len(text), ((text, True),)


def _file_kind(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix == ".parquet" else "text"


def _file_docs(files: list[Path], fmt: str, column: str, piece_bytes: int) -> Iterator[Doc]:
    for path in files:
        kind = _file_kind(path, fmt)
        if kind == "text":
            yield str(path), path.stat().st_size, _text_pieces(path, piece_bytes)
        elif kind == "jsonl":
            yield from _row_docs(_jsonl_rows(path, column))
        else:
            yield from _row_docs(_parquet_rows(path, column, piece_bytes))


def _capped(docs: Iterable[Doc], max_bytes: int | None, dropped: collections.Counter) -> Iterator[Piece]:
    """Number the documents and stop before the first one that would take the total above ``max_bytes``."""
    doc = total = 0
    for name, nbytes, pieces in docs:
        if max_bytes is not None and doc and total + nbytes > max_bytes:
            return
        got = False
        for text, last in pieces:
            got = True
            yield Piece(doc, name, text, last)
        if got:
            doc += 1
            total += nbytes
        else:
            dropped["empty"] += 1


def iter_corpus(patterns: list[str], fmt: str = "auto", text_column: str = "text", *,
                max_bytes: int | None = None, hf_split: str = "train",
                dropped: collections.Counter | None = None, piece_bytes: int = 1 << 16) -> Iterator[Piece]:
    """Stream the documents of a corpus as :class:`Piece` s, in corpus order, with bounded memory.

    Args:
        patterns: files, folders or recursive globs (see :func:`find_files`); for ``fmt="hf"`` each is a
            ``save_to_disk`` folder or data files (``.json``/``.jsonl``/``.ndjson``/``.parquet``/``.csv``/``.txt``).
        fmt: ``auto`` (per file: ``.jsonl``/``.json``/``.ndjson`` -> jsonl, ``.parquet`` -> parquet, else text),
            ``text``, ``jsonl``, ``parquet`` or ``hf``.
        text_column: column / field holding the text (jsonl, parquet, hf).
        max_bytes: stop before the first document that would take the total UTF-8 size (bytes) above this
            (text files: judged by file size, before reading); at least one document is always yielded.
            None: no cap.
        hf_split: split of a ``DatasetDict`` folder / of ``load_dataset`` (hf).
        dropped: if given, ``dropped["empty"]`` is increased for each document skipped because its text is
            empty, whitespace only or null.
        piece_bytes: text files are read in blocks and yielded in pieces of about this many bytes.

    Returns:
        A lazy iterator. Format, file and folder problems are raised here; content problems while iterating.

    Raises:
        ValueError: unknown ``fmt`` (listing the choices), ``piece_bytes < 1``; while iterating: a text file
            that is not UTF-8 (``path:lineno``), a JSONL row that is invalid, lacks ``text_column`` or has a
            non-string value (``path:lineno``), a parquet file or hf dataset without ``text_column``
            (listing the columns found), an hf ``DatasetDict`` without ``hf_split`` (listing the splits).
        FileNotFoundError: a pattern that matches no file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {list(FORMATS)}")
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes={piece_bytes} must be >= 1")
    dropped = collections.Counter() if dropped is None else dropped
    if fmt == "hf":
        sources = [(pat, _hf_source(pat)) for pat in patterns]
        if not sources:
            raise FileNotFoundError("no corpus patterns given")
        rows = itertools.chain.from_iterable(_hf_rows(pat, src, text_column, hf_split, piece_bytes)
                                             for pat, src in sources)
        docs: Iterable[Doc] = _row_docs(rows)
    else:
        docs = _file_docs(find_files(patterns), fmt, text_column, piece_bytes)
    return _capped(docs, max_bytes, dropped)


# --------------------------------------------------------------------------- token files
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
            document in the train split ("need at least 2 documents"); errors of ``pieces`` pass through.
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
    if train.docs == 0:
        raise ValueError(f"need at least 2 documents for a train/validation split, got {train.docs + val.docs} "
                         f"({val.docs} went to validation, val_fraction={val_fraction})")
    return TokenizeStats(train=train, val=val, counts=counts, seconds=time.perf_counter() - start)
