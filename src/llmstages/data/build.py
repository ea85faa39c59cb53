"""The ``data`` pipeline stage: corpus -> tokenizer -> token files + verifiable task sets.

Everything is derived deterministically from the arguments (and, for the default
corpus, from the running Python's standard library), so two runs with the same
arguments produce byte-identical files. Output layout of ``out_dir``::

    tokenizer.json                 byte-level BPE (llmstages.tokenizer)
    train.bin, val.bin             little-endian uint16 token ids; every document is followed by EOS
    meta.json                      vocab size, token/byte counts, entropy, document names, task counts
    metrics.json                   flat dict of numbers (also returned by build_data)
    sft_{train,val}.jsonl          {"prompt", "response", "task"}
    pref_{train,val}.jsonl         {"prompt", "chosen", "rejected", "task"}
    prompts_{train,val}.jsonl      {"prompt", "answer", "task"}   (RL prompts with checkable answers)
"""

from __future__ import annotations

import glob as globlib
import importlib
import inspect
import json
import os
import random
import re
import secrets
import shutil
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmstages.checkpoint import write_json
from llmstages.data.jsonio import iter_jsonl, require_fields
from llmstages.tokenizer import EOS_ID, save_tokenizer, train_tokenizer

MB = 1_000_000  #: bytes per "megabyte" in ``max_corpus_mb`` / ``corpus_mb``
STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
DOC_MODULES = (
    "base64", "bisect", "calendar", "collections", "colorsys", "copy", "difflib", "fnmatch",
    "functools", "glob", "hashlib", "heapq", "html", "itertools", "json", "keyword", "math",
    "operator", "os.path", "random", "re", "secrets", "shlex", "shutil", "statistics", "string",
    "struct", "textwrap", "urllib.parse", "uuid", "zlib",
)
SFT_FIELDS = ("prompt", "response")
PREF_FIELDS = ("prompt", "chosen", "rejected")

Source = tuple[str, Callable[[], "str | None"]]  # (document name, loader); loader -> None means skip


# --------------------------------------------------------------------------- corpus
def _stdlib_sources(seed: int) -> list[Source]:
    """Stdlib ``.py`` files and pydoc topics, in a seeded shuffled (diverse, deterministic) order.

    Undecodable or empty stdlib files are skipped (their loader returns None).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
        files += [str(Path(d, n).relative_to(root)) for n in sorted(names) if n.endswith(".py")]

    def load_file(rel: str) -> str | None:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return None
        return text if text.strip() else None

    from pydoc_data.topics import topics

    sources: list[Source] = [(f"stdlib/{r}", lambda r=r: load_file(r)) for r in sorted(files)]
    sources += [(f"pydoc_topics/{k}", lambda k=k: topics[k]) for k in sorted(topics)]
    random.Random(seed).shuffle(sources)
    return sources


def _user_sources(patterns: list[str]) -> list[Source]:
    """Files matched by ``patterns`` (recursive globs), pattern order, each pattern's matches sorted.

    Raises:
        FileNotFoundError: a pattern matches no file.
    """
    seen: set[str] = set()
    sources: list[Source] = []
    for pat in patterns:
        matches = sorted(p for p in globlib.glob(str(pat), recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"corpus pattern matched no files: {pat!r}")
        for p in matches:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                sources.append((p, lambda p=p: _read_utf8(p)))
    return sources


def _read_utf8(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file is not valid UTF-8: {path} ({e})") from e


def _take(sources: list[Source], cap_bytes: int, bar: Progress) -> list[tuple[str, str]]:
    """Load whole documents in order until the next one would exceed ``cap_bytes`` (>= 1 doc)."""
    task = bar.add_task("reading corpus", total=cap_bytes)
    docs: list[tuple[str, str]] = []
    total = 0
    for name, load in sources:
        text = load()
        if text is None:
            continue
        n = len(text.encode("utf-8"))
        if docs and total + n > cap_bytes:
            break
        docs.append((name, text))
        total += n
        bar.update(task, completed=min(total, cap_bytes))
    return docs


def _tokenize(tok, texts: list[str], bar: Progress, label: str) -> np.ndarray:
    """Concatenate ``encode(text) + [EOS]`` for every text. Returns a uint16 array."""
    task = bar.add_task(f"tokenizing {label}", total=len(texts))
    parts: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.uint16)
    for i in range(0, len(texts), 64):
        chunk = texts[i : i + 64]
        for enc in tok.encode_batch(chunk, add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=np.uint16), eos]
        bar.advance(task, len(chunk))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


# --------------------------------------------------------------------------- task sets
def arithmetic_qa(max_n: int) -> list[tuple[str, str]]:
    """``("What's a op b?", answer)`` for a, b in 0..max_n, op in "+", "-" (a >= b for "-")."""
    qa = []
    for a in range(max_n + 1):
        for b in range(max_n + 1):
            qa.append((f"What's {a} + {b}?", str(a + b)))
            if a >= b:
                qa.append((f"What's {a} - {b}?", str(a - b)))
    return qa


def first_sentence(doc: str | None, name: str) -> str | None:
    """First sentence of a docstring's first paragraph (whitespace collapsed), or None.

    None if there is no docstring, the paragraph starts with ``name(`` (a C signature
    line), or the sentence is shorter than 10 / longer than 200 characters.
    """
    if not doc:
        return None
    para = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())
    if para.startswith(name + "("):
        return None
    m = re.search(r"\.(?=\s|$)", para)
    s = para[: m.end()] if m else para
    return s if 10 <= len(s) <= 200 else None


def docstring_qa(modules: tuple[str, ...] = DOC_MODULES) -> list[tuple[str, str]]:
    """``("What does mod.fn do?", first sentence)`` for public documented callables, sorted.

    Skips aliases (``obj.__name__ != name``) and classes without a docstring of their own.
    """
    qa = []
    for modname in sorted(modules):
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None) or dir(mod)
        for name in sorted(set(names)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or obj is None or inspect.ismodule(obj) or not callable(obj):
                continue
            if getattr(obj, "__name__", name) != name:  # alias (bisect.bisect) or bound builtin
                continue
            if inspect.isclass(obj) and vars(obj).get("__doc__") in (None, "An enumeration."):
                continue  # docstring inherited from a base class
            s = first_sentence(inspect.getdoc(obj), name)
            if s:
                qa.append((f"What does {modname}.{name} do?", s))
    return qa


ARITH_PROMPT = re.compile(r"What's (\d+) ([+-]) (\d+)\?")


def arith_slips(prompt: str, answer: str) -> dict[str, list[int]]:
    """Plausible wrong answers to an arithmetic question, by kind of slip.

    ``carry`` (a carry dropped or added: ±10), ``transposed`` (the answer's two digits swapped),
    ``operation`` (the other operation applied), ``off_by_one`` (±1). Only non-negative values that differ
    from the answer are kept.
    """
    a, op, b = ARITH_PROMPT.fullmatch(prompt).groups()
    a, b, x = int(a), int(b), int(answer)
    slips = {"carry": [x + 10, x - 10], "transposed": [int(str(x)[::-1])] if len(str(x)) == 2 else [],
             "operation": [a - b if op == "+" else a + b], "off_by_one": [x + 1, x - 1]}
    return {k: [v for v in vals if v >= 0 and v != x] for k, vals in slips.items()}


def _arith_rejects(prompt: str, answer: str, seed: int, k: int = 2) -> list[str]:
    """``k`` distinct plausible wrong answers of different slip kinds (:func:`arith_slips`), seeded per question.

    Carry, transposition and operation slips come first (in a seeded order); off-by-one only fills in when
    fewer than ``k`` of those apply.
    """
    rng = random.Random(f"{seed}:{prompt}")
    slips = arith_slips(prompt, answer)
    kinds = [kd for kd in ("carry", "transposed", "operation") if slips[kd]]
    rng.shuffle(kinds)
    out: list[int] = []
    for kind in [*kinds, "off_by_one", "off_by_one"]:
        options = [v for v in slips[kind] if v not in out]
        if options and len(out) < k:
            out.append(rng.choice(options))
    return [str(v) for v in out]


def _val_questions(questions: list[str], fraction: float, seed: int) -> set[str]:
    """Seeded choice of ``round(n * fraction)`` (>= 1 when fraction > 0 and n > 1) held-out questions."""
    order = list(dict.fromkeys(questions))
    n = len(order)
    n_val = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


def _split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows by ``row["prompt"]``, separately per ``row["task"]``; row order is kept."""
    val: set[str] = set()
    for task in sorted({r["task"] for r in rows}):
        val |= _val_questions([r["prompt"] for r in rows if r["task"] == task], fraction, seed)
    return [r for r in rows if r["prompt"] not in val], [r for r in rows if r["prompt"] in val]


def _default_tasks(arithmetic_max: int, seed: int, fraction: float) -> dict[str, list[dict]]:
    """Default sft/pref/prompts rows for both splits, keyed like ``"sft_train"``.

    Docstring rejections are drawn from the same split's answers, so train/val stay disjoint.
    """
    qa = [(q, a, "arithmetic") for q, a in arithmetic_qa(arithmetic_max)]
    qa += [(q, a, "docstring") for q, a in docstring_qa()]
    base = [{"prompt": q, "answer": a, "task": t} for q, a, t in qa]
    out: dict[str, list[dict]] = {}
    for split, rows in zip(("train", "val"), _split_rows(base, fraction, seed)):
        out[f"prompts_{split}"] = rows
        out[f"sft_{split}"] = [{"prompt": r["prompt"], "response": r["answer"], "task": r["task"]} for r in rows]
        doc_answers = [r["answer"] for r in rows if r["task"] == "docstring"]
        pref = []
        for r in rows:
            if r["task"] == "arithmetic":
                rejects = _arith_rejects(r["prompt"], r["answer"], seed)
            else:
                others = [a for a in doc_answers if a != r["answer"]]
                rejects = [random.Random(f"{seed}:{r['prompt']}").choice(others)] if others else []
            pref += [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": x, "task": r["task"]} for x in rejects]
        out[f"pref_{split}"] = pref
    return out


# --------------------------------------------------------------------------- user JSONL
def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Read and validate a JSONL file of objects with string ``fields`` (optional string "task").

    Returns rows reduced to ``fields`` + ``task`` (default ``"user"``); blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming ``path:lineno`` for bytes that are not UTF-8 or invalid JSON (chained from the
            decoding error), a non-object row, a missing field (listing the fields found) or a non-string
            field; naming ``path`` for an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


# --------------------------------------------------------------------------- stage
def build_data(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    max_corpus_mb: float = 8.0,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seed: int = 1234,
    arithmetic_max: int = 20,
    heldout_fraction: float = 0.1,
    sft_path: str | None = None,
    preference_path: str | None = None,
    progress: bool = True,
) -> dict:
    """Build the data stage into ``out_dir`` atomically (see module docstring for the layout).

    Args:
        out_dir: output directory; replaced as a whole only after everything succeeded.
        corpus: file paths / recursive globs (one document per file); None/empty -> the stdlib
            ``.py`` sources + pydoc topics in a seeded shuffled order.
        max_corpus_mb: cap on corpus UTF-8 size in MB (10**6 bytes), by whole documents (>= 1).
        vocab_size: tokenizer vocab size, 262..65535 (tokens are stored as uint16).
        val_fraction: fraction of documents (>= 1) used for validation.
        seed: seeds every random choice (document split, question split, rejected answers).
        arithmetic_max: operands of the arithmetic task range over 0..arithmetic_max.
        heldout_fraction: fraction of questions (per task) held out for the ``*_val`` task files.
        sft_path / preference_path: optional user JSONL replacing the default SFT / preference set.
        progress: show a rich progress bar while reading and tokenizing.

    Returns:
        Flat dict of numbers (also written to ``metrics.json``): train_tokens, val_tokens,
        vocab_size, unigram_entropy_nats, n_sft_train, n_sft_val, n_pref_train, n_pref_val,
        n_prompts_train, n_prompts_val, corpus_mb.

    Raises:
        ValueError: bad arguments, fewer than 2 documents, non-UTF-8 corpus file, invalid user JSONL.
        FileNotFoundError: a corpus pattern matching nothing, a missing user JSONL file.
        NotADirectoryError: ``out_dir`` exists and is not a directory.
    """
    if not 262 <= vocab_size <= 65535:
        raise ValueError(f"vocab_size={vocab_size} must be in 262..65535 (uint16 token files)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    if not max_corpus_mb > 0:
        raise ValueError(f"max_corpus_mb={max_corpus_mb} must be > 0")
    if arithmetic_max < 0:
        raise ValueError(f"arithmetic_max={arithmetic_max} must be >= 0")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir exists and is not a directory: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        metrics = _build_into(tmp, corpus=corpus, max_corpus_mb=max_corpus_mb, vocab_size=vocab_size,
                              val_fraction=val_fraction, seed=seed, arithmetic_max=arithmetic_max,
                              heldout_fraction=heldout_fraction, sft_path=sft_path,
                              preference_path=preference_path, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return metrics


def _build_into(tmp: Path, *, corpus, max_corpus_mb, vocab_size, val_fraction, seed, arithmetic_max,
                heldout_fraction, sft_path, preference_path, progress) -> dict:
    # Task sets first: user-file errors surface before the expensive corpus work.
    tasks = _default_tasks(arithmetic_max, seed, heldout_fraction)
    for kind, path, fields in (("sft", sft_path, SFT_FIELDS), ("pref", preference_path, PREF_FIELDS)):
        if path:
            tasks[f"{kind}_train"], tasks[f"{kind}_val"] = _split_rows(read_jsonl(path, fields), heldout_fraction, seed)
            if not tasks[f"{kind}_train"] or not tasks[f"{kind}_val"]:
                raise ValueError(f"{path}: {len({r['prompt'] for r in read_jsonl(path, fields)})} distinct prompt(s); "
                                 f"at least 2 are needed so that one can be held out (data.heldout_fraction="
                                 f"{heldout_fraction})")

    sources = _user_sources(list(corpus)) if corpus else _stdlib_sources(seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        docs = _take(sources, int(max_corpus_mb * MB), bar)
        if len(docs) < 2:
            raise ValueError(f"need at least 2 corpus documents for a train/val split, got {len(docs)}")
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        val_idx = set(random.Random(seed).sample(range(len(docs)), n_val))
        train_docs = [d for i, d in enumerate(docs) if i not in val_idx]
        val_docs = [d for i, d in enumerate(docs) if i in val_idx]

        task = bar.add_task("training tokenizer", total=1)
        tok = train_tokenizer((t for _, t in train_docs), vocab_size)
        bar.advance(task)
        save_tokenizer(tok, tmp / "tokenizer.json")
        train = _tokenize(tok, [t for _, t in train_docs], bar, "train")
        val = _tokenize(tok, [t for _, t in val_docs], bar, "val")

    train.astype("<u2").tofile(tmp / "train.bin")
    val.astype("<u2").tofile(tmp / "val.bin")
    counts = np.bincount(train, minlength=tok.get_vocab_size())
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())

    for name, rows in tasks.items():
        _write_jsonl(tmp / f"{name}.jsonl", rows)
    nbytes = lambda ds: sum(len(t.encode("utf-8")) for _, t in ds)  # noqa: E731
    metrics = {
        "train_tokens": int(train.size), "val_tokens": int(val.size), "vocab_size": tok.get_vocab_size(),
        "unigram_entropy_nats": entropy, "corpus_mb": (nbytes(train_docs) + nbytes(val_docs)) / MB,
        **{f"n_{name}": len(tasks[name]) for name in sorted(tasks)},
    }
    meta = {
        "vocab_size": tok.get_vocab_size(), "dtype": "uint16", "eos_id": EOS_ID,
        "train_tokens": int(train.size), "val_tokens": int(val.size),
        "train_bytes": nbytes(train_docs), "val_bytes": nbytes(val_docs), "unigram_entropy_nats": entropy,
        "n_train_docs": len(train_docs), "n_val_docs": len(val_docs),
        "train_docs": [n for n, _ in train_docs], "val_docs": [n for n, _ in val_docs],
        **{f"n_{name}": len(tasks[name]) for name in sorted(tasks)},
        "task_counts": {name: dict(sorted(Counter(r["task"] for r in rows).items()))
                        for name, rows in sorted(tasks.items())},
        "seed": seed,
    }
    write_json(tmp / "meta.json", meta)
    write_json(tmp / "metrics.json", metrics)
    return metrics


def iter_documents(bin_path: str | Path) -> Iterator[np.ndarray]:
    """Yield the token ids of each EOS-terminated document in a ``*.bin`` file (EOS excluded)."""
    arr = np.fromfile(bin_path, dtype="<u2")
    start = 0
    for end in np.flatnonzero(arr == EOS_ID):
        yield arr[start:end]
        start = end + 1
