"""Corpus readers for columnar sources, imported only when one is read: parquet files (``pyarrow``) and Hugging
Face datasets (``datasets``: ``save_to_disk`` folders, or data files streamed with ``load_dataset``). Each yields
``(where, text or None)`` per row, in batches of about a target size (bounded memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from llmstages.data.corpus import find_files

HF_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
               ".txt": "text"}


def _batch_rows(avg_row_bytes: float, target_bytes: int) -> int:
    """Rows per batch so that a batch holds about ``target_bytes`` (1..65536)."""
    return int(min(65536, max(1, target_bytes // max(avg_row_bytes, 1.0))))


def parquet_rows(path: Path, column: str, target_bytes: int) -> Iterator[tuple[str, str | None]]:
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


def hf_source(pattern: str) -> tuple[str, object]:
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


def hf_rows(pattern: str, source: tuple[str, object], column: str, split: str,
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
