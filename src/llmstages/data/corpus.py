"""Pretraining corpora read as a stream with bounded memory (tokenized into token files by :mod:`.tokens`).

Formats (``fmt``): ``text`` (one file = one document), ``jsonl`` (one row = one document, text in a column;
a ``.json`` file holding one JSON array is also accepted), ``parquet`` (one row = one document), ``hf``
(a ``datasets`` ``save_to_disk`` folder, or data files loaded with ``datasets.load_dataset``) and ``auto``
(``text`` / ``jsonl`` / ``parquet`` chosen per file by its extension).

:func:`iter_corpus` yields :class:`Piece` s: a document is one or more consecutive pieces, the last one marked
``last=True``. Large text files are cut into pieces of about ``piece_bytes`` at places where a byte-level BPE
with a GPT-2-style regex pre-tokenizer (+ individual digits) splits anyway, so encoding the pieces separately
gives exactly the ids of encoding the whole file. :func:`~llmstages.data.tokens.write_token_files` encodes
the pieces a chunk at a time (``tokenizers`` spreads a batch over all CPU cores) and appends the ids to
``train``/``val`` token files.

``datasets`` and ``pyarrow`` are imported only when a parquet or hf corpus is read.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmstages.data.jsonio import iter_rows, require_fields

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


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
    if suffix in (".gz", ".bz2", ".xz") and len(path.suffixes) > 1:  # rows.jsonl.gz: read decompressed (jsonio)
        suffix = path.suffixes[-2].lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix == ".parquet" else "text"


def _text_docs(path: Path, piece_bytes: int, doc_bytes: int | None) -> Iterator[Doc]:
    """A text file as one document, or (``doc_bytes``) as documents ``"path#k"`` (k = 0, 1, ...) of about
    ``doc_bytes`` UTF-8 bytes each: the file is read in pieces of ``min(piece_bytes, doc_bytes // 8)`` bytes, cut
    at a line end where the piece has one (else between words, :func:`_last_cut`), and a document ends after the
    piece that takes it to ``doc_bytes`` or more (so up to about 1.125 x ``doc_bytes``). Whitespace-only parts
    give no piece (dropped)."""
    if doc_bytes is None:
        yield str(path), path.stat().st_size, _text_pieces(path, piece_bytes)
        return
    part: list[str] = []
    size = k = 0
    for text, last in _text_pieces(path, max(1, min(piece_bytes, doc_bytes // 8))):
        part.append(text)
        size += _utf8_len(text)
        if size >= doc_bytes or last:
            if "".join(part).strip():
                yield f"{path}#{k}", size, [(t, i == len(part) - 1) for i, t in enumerate(part)]
            else:
                yield f"{path}#{k}", 0, ()
            k += 1
            part, size = [], 0


def _file_docs(files: list[Path], fmt: str, column: str, piece_bytes: int,
               doc_bytes: int | None = None) -> Iterator[Doc]:
    for path in files:
        kind = _file_kind(path, fmt)
        if kind == "text":
            yield from _text_docs(path, piece_bytes, doc_bytes)
        elif kind == "jsonl":
            yield from _row_docs(_jsonl_rows(path, column))
        else:
            from .columnar import parquet_rows  # pyarrow only when a parquet file is read

            yield from _row_docs(parquet_rows(path, column, piece_bytes))


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
                dropped: collections.Counter | None = None, piece_bytes: int = 1 << 16,
                doc_bytes: int | None = None) -> Iterator[Piece]:
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
        doc_bytes: split each text file into documents of about this many UTF-8 bytes, ending at line ends
            where the text has them (named ``"path#k"``; see :func:`_text_docs`); None: one file, one document.
            Rows of JSONL, parquet and hf corpora are documents as they are.

    Returns:
        A lazy iterator. Format, file and folder problems are raised here; content problems while iterating.

    Raises:
        ValueError: unknown ``fmt`` (listing the choices), ``piece_bytes < 1``, ``doc_bytes < 1``; while iterating: a text file
            that is not UTF-8 (``path:lineno``), a JSONL row that is invalid, lacks ``text_column`` or has a
            non-string value (``path:lineno``), a parquet file or hf dataset without ``text_column``
            (listing the columns found), an hf ``DatasetDict`` without ``hf_split`` (listing the splits).
        FileNotFoundError: a pattern that matches no file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {list(FORMATS)}")
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes={piece_bytes} must be >= 1")
    if doc_bytes is not None and doc_bytes < 1:
        raise ValueError(f"doc_bytes={doc_bytes} must be >= 1 (or None: one document per file)")
    dropped = collections.Counter() if dropped is None else dropped
    if fmt == "hf":
        from .columnar import hf_rows, hf_source  # datasets only when an hf corpus is read

        sources = [(pat, hf_source(pat)) for pat in patterns]
        if not sources:
            raise FileNotFoundError("no corpus patterns given")
        rows = itertools.chain.from_iterable(hf_rows(pat, src, text_column, hf_split, piece_bytes)
                                             for pat, src in sources)
        docs: Iterable[Doc] = _row_docs(rows)
    else:
        docs = _file_docs(find_files(patterns), fmt, text_column, piece_bytes, doc_bytes)
    return _capped(docs, max_bytes, dropped)
