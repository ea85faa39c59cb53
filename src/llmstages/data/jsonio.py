"""Streaming readers for user row files (JSONL, JSON arrays), with errors that name the file and line.

Every reader yields ``(where, row)`` pairs: ``where`` is ``"path:lineno"`` (JSONL, physical line numbers,
1-based) or ``"path[index]"`` (a JSON array), to be used as the prefix of any later error about that row.
Memory stays bounded for JSONL (one line at a time). Files compressed with gzip, bzip2 or xz (as public datasets
often ship, e.g. ``train.jsonl.gz``) are read as they are: the format is told by the file's first bytes, not its
name; a zstandard file (``.zst``) gets an error saying to decompress it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


# First bytes of compressed files -> the standard-library module that reads them.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "lzma"}
_ZSTD = b"\x28\xb5\x2f\xfd"


def open_bytes(path: Path):
    """``path`` opened for reading bytes, decompressed on the fly when it is a gzip, bzip2 or xz file.

    Raises:
        ValueError: a zstandard-compressed file (naming it and the command that decompresses it).
    """
    import importlib

    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(_ZSTD):
        raise ValueError(f"{path}: zstandard-compressed, which is not read here; decompress it first "
                         f"(zstd -d {path}) and point to the .jsonl/.json file")
    for magic, module in _COMPRESSED.items():
        if head.startswith(magic):
            return importlib.import_module(module).open(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[str, dict]]:
    """Yield ``("path:lineno", row)`` for each non-blank line of a JSONL file; with ``skip_bad``, a line that
    is not a JSON object yields ``("path:lineno", ValueError)`` (the error below) and reading goes on.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``path:lineno`` of bytes that are not UTF-8 or of invalid JSON (chained from the decoding
            error), or of a line that is valid JSON but not an object ("row must be an object").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                     "line)") from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # a row cut short: its column, not "line 2 column 1"
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: row must be an object, got {type(row).__name__}")
            except ValueError as e:
                if not skip_bad:
                    raise
                row = e
            yield f"{path}:{lineno}", row


def iter_json_array(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("path[i]", row)`` for each element of a file holding one JSON array of objects (Alpaca style).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 or invalid JSON (line and column of the fault), not an array, or an element that
            is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open_bytes(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from e
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of objects (or JSONL), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}[{i}]: row must be an object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def iter_rows(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[str, dict]]:
    """Rows of a ``.json`` file (one array, or JSONL content) or of any other file read as JSONL (``skip_bad``:
    as :func:`iter_jsonl`; a JSON array is read whole, so its syntax errors always stop)."""
    path = Path(path)
    if ".json" in path.suffixes[-2:] and path.is_file():
        with open_bytes(path) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return iter_json_array(path)
    return iter_jsonl(path, skip_bad)


def require_fields(where: str, row: dict, fields: tuple[str, ...] | list[str]) -> None:
    """Raise ``ValueError`` naming ``where``, the first missing field, the required and the found fields."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r} (required {list(fields)}, found {sorted(row)})")


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Read and validate a JSONL file of objects with string ``fields`` (optional string "task").

    Returns rows reduced to ``fields`` + ``task`` (default ``"user"``); blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming ``path:lineno`` for bytes that are not UTF-8 or invalid JSON (chained from the
            decoding error), a non-object row, a missing field (listing the fields found) or a non-string
            field; naming ``path`` for an empty file.
    """
    rows = []
    for where, row in iter_jsonl(path):
        require_fields(where, row, fields)
        row.setdefault("task", "user")
        for f in (*fields, "task"):
            if not isinstance(row[f], str):
                raise ValueError(f"{where}: field {f!r} must be a string, got {type(row[f]).__name__}")
        rows.append({f: row[f] for f in (*fields, "task")})
    if not rows:
        raise ValueError(f"{path}: empty file, expected JSONL rows with fields {list(fields)}")
    return rows
