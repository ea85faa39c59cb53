"""The ``data`` pipeline stage: corpus -> tokenizer -> token files + verifiable task sets.

Everything is derived deterministically from the arguments (and, for the default corpus, from the running
Python's standard library), so two runs with the same arguments produce byte-identical files. User files are
validated first (any error names the file and line), then the corpus is streamed through the tokenizer
(:mod:`llmstages.data.corpus`), all into a temporary folder that replaces ``out_dir`` only on success. Output
layout of ``out_dir``::

    tokenizer.json, tokenizer_config.json   trained byte-level BPE or the brought tokenizer (llmstages.tokenizer)
    train.bin, val.bin             little-endian token ids (uint16, or uint32 for vocabularies over 65536);
                                   every document is followed by EOS; the split is by document
    meta.json                      dtype, special ids, token/byte/document counts, entropy, drop counts
    metrics.json                   flat dict of numbers (also returned by build_data)
    sft_{train,val}.jsonl          {"messages": [{"role", "content"}, ...], "task"}
    pref_{train,val}.jsonl         {"prompt": [messages], "chosen", "rejected", "task"}
    prompts_{train,val}.jsonl      {"prompt", "answer", "task"}   (RL prompts with checkable answers)
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmstages.checkpoint import write_json
from llmstages.data.corpus import Piece, corpus_bytes, iter_corpus
from llmstages.data.tokens import is_val_doc, token_dtype, write_token_files
from llmstages.data.formats import load_preferences, load_sft
from llmstages.data.jsonio import read_jsonl  # noqa: F401  (part of the data stage's API)
from llmstages.data.tasks import (ARITHMETIC_LINES_PER_DOC, EXPLAIN_SFT_SIMPLE, EXPLAIN_SFT_TECHNICAL, SMALL_SUM_COPIES, arith_rejects, arithmetic_documents, arithmetic_qa,
                                  docstring_qa, explain_rows, is_small_sum)
from llmstages.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger("llmstages")
MB = 1_000_000  #: bytes per "megabyte" in ``max_corpus_mb`` / ``corpus_mb``
STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})




# --------------------------------------------------------------------------- corpus
def _stdlib_pieces(seed: int, max_bytes: int | None) -> Iterator[Piece]:
    """Stdlib ``.py`` files and pydoc topics as whole-document pieces, in a seeded shuffled (diverse,
    deterministic) order, up to ``max_bytes`` by whole documents. Undecodable or empty files are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
        names += [f"stdlib/{Path(d, n).relative_to(root)}" for n in sorted(files) if n.endswith(".py")]
    from pydoc_data.topics import topics

    names += [f"pydoc_topics/{k}" for k in sorted(topics)]
    random.Random(seed).shuffle(names)
    total, doc = 0, 0
    for name in names:
        try:
            text = topics[name[13:]] if name.startswith("pydoc_topics/") else (root / name[7:]).read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        n = len(text.encode("utf-8"))
        if max_bytes is not None and doc and total + n > max_bytes:
            return
        total += n
        yield Piece(doc, name, text, True)
        doc += 1


# --------------------------------------------------------------------------- task sets
def _val_questions(questions: list[str], fraction: float, seed: int) -> set[str]:
    """Seeded choice of ``round(n * fraction)`` (>= 1 when fraction > 0 and n > 1) held-out questions."""
    order = list(dict.fromkeys(questions))
    n = len(order)
    n_val = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


def prompt_key(row: dict) -> str:
    """What a held-out split groups by: the prompt text, or for a conversation everything before its last turn."""
    prompt = row["prompt"] if "prompt" in row else row["messages"][:-1]
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows by :func:`prompt_key`, separately per ``row["task"]``; row order is kept."""
    val: set[str] = set()
    for task in sorted({r["task"] for r in rows}):
        val |= _val_questions([prompt_key(r) for r in rows if r["task"] == task], fraction, seed)
    return [r for r in rows if prompt_key(r) not in val], [r for r in rows if prompt_key(r) in val]


def _chat(prompt: str, response: str | None = None) -> list[dict]:
    return [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": response}] if response else [])


def _default_tasks(arithmetic_max: int, seed: int, fraction: float) -> dict[str, list[dict]]:
    """Default sft/pref/prompts rows for both splits, keyed like ``"sft_train"``, in the canonical forms
    (tasks: :mod:`llmstages.data.tasks`).

    Arithmetic and docstring questions are split by question, ``explain`` prompts by topic. Docstring
    rejections are drawn from the same split's answers, so train/val stay disjoint. An ``explain`` prompt appears
    in the SFT set ``EXPLAIN_SFT_SIMPLE`` times with its simple answer and ``EXPLAIN_SFT_TECHNICAL`` times with
    its technical one; its preference pair always prefers the simple one. Small training sums (:func:`is_small_sum`) appear
    ``SMALL_SUM_COPIES`` times in ``sft_train``.
    """
    qa = [(q, a, "arithmetic") for q, a in arithmetic_qa(arithmetic_max)]
    qa += [(q, a, "docstring") for q, a in docstring_qa()]
    base = [{"prompt": q, "answer": a, "task": t} for q, a, t in qa]
    explain = explain_rows()
    val_topics = _val_questions([r["topic"] for r in explain], fraction, seed)
    out: dict[str, list[dict]] = {}
    for split, rows in zip(("train", "val"), _split_rows(base, fraction, seed)):
        ex = [r for r in explain if (r["topic"] in val_topics) == (split == "val")]
        out[f"prompts_{split}"] = rows + [{"prompt": r["prompt"], "answer": r["answer"], "task": "explain"} for r in ex]
        sft_answers = {r["prompt"]: [r["answer"]] * EXPLAIN_SFT_SIMPLE + [r["rejected"]] * EXPLAIN_SFT_TECHNICAL
                       for r in ex}
        copies = {r["prompt"]: SMALL_SUM_COPIES if split == "train" and is_small_sum(r["prompt"]) else 1
                  for r in out[f"prompts_{split}"]}
        out[f"sft_{split}"] = [{"messages": _chat(r["prompt"], a), "task": r["task"]} for r in out[f"prompts_{split}"]
                               for a in sft_answers.get(r["prompt"], [r["answer"]] * copies[r["prompt"]])]
        doc_answers = [r["answer"] for r in rows if r["task"] == "docstring"]
        pref = []
        for r in rows:
            if r["task"] == "arithmetic":
                rejects = arith_rejects(r["prompt"], r["answer"], seed)
            else:
                others = [a for a in doc_answers if a != r["answer"]]
                rejects = [random.Random(f"{seed}:{r['prompt']}").choice(others)] if others else []
            pref += [{"prompt": _chat(r["prompt"]), "chosen": r["answer"], "rejected": x, "task": r["task"]}
                     for x in rejects]
        pref += [{"prompt": _chat(r["prompt"]), "chosen": r["answer"], "rejected": r["rejected"], "task": "explain"}
                 for r in ex]
        out[f"pref_{split}"] = pref
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


# --------------------------------------------------------------------------- stage
def build_data(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    corpus_format: str = "auto",
    text_column: str = "text",
    hf_split: str = "train",
    max_corpus_mb: float | None = 8.0,
    max_doc_mb: float | None = None,
    tokenizer: dict | None = None,
    vocab_size: int = 4096,
    tokenizer_sample_mb: float = 64.0,
    val_fraction: float = 0.05,
    seed: int = 1234,
    arithmetic_max: int = 99,
    heldout_fraction: float = 0.1,
    arithmetic_corpus_passes: int = 8,
    sft: dict | None = None,
    preference: dict | None = None,
    progress: bool = True,
) -> dict:
    """Build the data stage into ``out_dir`` atomically (see module docstring for the layout).

    Args:
        out_dir: output directory; replaced as a whole only after everything succeeded.
        corpus: files, folders or recursive globs (see :func:`llmstages.data.corpus.iter_corpus`); None/empty ->
            the stdlib ``.py`` sources + pydoc topics in a seeded shuffled order.
        corpus_format / text_column / hf_split: how corpus files are read (``auto`` goes by file extension).
        max_corpus_mb: cap on corpus UTF-8 size in MB (10**6 bytes), by whole documents (>= 1); None = no cap.
        max_doc_mb: split each text file of ``corpus`` into documents of about this many MB, at line ends
            (e.g. one long book; see :func:`llmstages.data.corpus.iter_corpus`'s ``doc_bytes``); None = one file,
            one document.
        tokenizer: ``{"path", "bos_token", "eos_token", "pad_token"}`` of a local Hugging Face tokenizer to use
            as is (see :func:`llmstages.tokenizer.load_tokenizer`); None or no path -> train byte-level BPE.
        vocab_size: vocabulary size of the trained tokenizer (262..2**20; token files are uint32 above 65536).
        tokenizer_sample_mb: MB of training documents (in corpus order) the tokenizer is trained on.
        val_fraction: fraction of documents held out for validation (document 0 always is).
        seed: seeds every random choice (document split, question split, rejected answers).
        arithmetic_max: operands of the arithmetic task range over 0..arithmetic_max.
        heldout_fraction: fraction of prompts (per task) held out for the ``*_val`` task files.
        arithmetic_corpus_passes: times each training arithmetic question is added, solved, to the default
            (stdlib) corpus as plain text (:func:`llmstages.data.tasks.arithmetic_documents`, after its own
            documents and beyond ``max_corpus_mb``); held-out questions never are. 0: none. A corpus of your
            own is left as it is.
        sft / preference: ``{"path", "format", "columns", "system_prompt"}`` of a user file replacing the
            built-in set (see :mod:`llmstages.data.formats`); None or no path -> the built-in set.
        progress: show rich progress bars while reading and tokenizing.

    Returns:
        Flat dict of numbers (also written to ``metrics.json``): token, document and byte counts, vocabulary
        size, unigram entropy, rows per task file, and rows read/kept/dropped per reason for user files.

    Raises:
        ValueError: bad arguments, fewer than 2 documents, undecodable or malformed input (naming the file and
            line), a user file that is empty or whose rows are all dropped (with the counts per reason).
        FileNotFoundError: a corpus pattern matching nothing, a missing user file or tokenizer.
        NotADirectoryError: ``out_dir`` exists and is not a directory.
    """
    if not (tokenizer or {}).get("path") and not 262 <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size={vocab_size} must be in 262..{1 << 20}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    if max_corpus_mb is not None and not max_corpus_mb > 0:
        raise ValueError(f"max_corpus_mb={max_corpus_mb} must be > 0 (or None for no cap)")
    if max_doc_mb is not None and not max_doc_mb * MB >= 1:
        raise ValueError(f"max_doc_mb={max_doc_mb} must be at least 1e-6 (one byte), or None: one document per file")
    if arithmetic_max < 0:
        raise ValueError(f"arithmetic_max={arithmetic_max} must be >= 0")
    if arithmetic_corpus_passes < 0:
        raise ValueError(f"arithmetic_corpus_passes={arithmetic_corpus_passes} must be >= 0")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir exists and is not a directory: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        metrics = _build_into(tmp, corpus=corpus, corpus_format=corpus_format, text_column=text_column,
                              hf_split=hf_split, max_corpus_mb=max_corpus_mb, max_doc_mb=max_doc_mb,
                              tokenizer=tokenizer or {},
                              vocab_size=vocab_size, tokenizer_sample_mb=tokenizer_sample_mb,
                              val_fraction=val_fraction, seed=seed, arithmetic_max=arithmetic_max,
                              heldout_fraction=heldout_fraction, arithmetic_corpus_passes=arithmetic_corpus_passes,
                              sft=sft or {}, preference=preference or {},
                              progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return metrics


def _user_sets(tasks: dict, sft: dict, preference: dict, fraction: float, seed: int) -> dict[str, int]:
    """Replace built-in sets in ``tasks`` by the user's files; returns their read/kept/dropped counts."""
    counts: dict[str, int] = {}
    for kind, spec, load in (("sft", sft, load_sft), ("pref", preference, load_preferences)):
        if not spec.get("path"):
            continue
        skip = spec.get("on_bad_row", "error") == "skip"
        try:
            rows, report = load(spec["path"], spec.get("format", "auto"), dict(spec.get("columns") or {}),
                                spec.get("system_prompt"), skip_bad=skip)
        except ValueError as err:  # a row at fault (file:line): say how to drop such rows instead
            if skip or not re.match(rf"{re.escape(str(spec['path']))}(:\d+|\[\d+\]): ", str(err)):
                raise
            key = "sft" if kind == "sft" else "preference"
            raise ValueError(f"{err} (to drop malformed rows and count them: data.{key}.on_bad_row=skip)") \
                from (err.__cause__ or err)  # the decoding error itself, as without the hint
        train, val = _split_rows(rows, fraction, seed)
        if not train or not val:
            raise ValueError(f"{spec['path']}: {len({prompt_key(r) for r in rows})} distinct prompt(s); at least 2 "
                             f"are needed so that one can be held out (data.heldout_fraction={fraction})")
        tasks[f"{kind}_train"], tasks[f"{kind}_val"] = train, val
        log.info("%s: %s format, %d rows read, %d kept%s", spec["path"], report.format, report.read, report.kept,
                 "".join(f", {n} dropped ({k})" for k, n in report.dropped.items()))
        counts |= {f"{kind}_rows_read": report.read, f"{kind}_rows_kept": report.kept,
                   **{f"{kind}_rows_dropped_{k}": n for k, n in report.dropped.items()}}
    return counts


def _build_into(tmp: Path, *, corpus, corpus_format, text_column, hf_split, max_corpus_mb, max_doc_mb, tokenizer,
                vocab_size, tokenizer_sample_mb, val_fraction, seed, arithmetic_max, heldout_fraction,
                arithmetic_corpus_passes, sft, preference, progress) -> dict:
    # Task sets first: user-file errors surface before the expensive corpus work.
    tasks = _default_tasks(arithmetic_max, seed, heldout_fraction)
    user_counts = _user_sets(tasks, sft, preference, heldout_fraction, seed)

    max_bytes = None if max_corpus_mb is None else int(max_corpus_mb * MB)
    dropped: Counter = Counter()

    arith_train = [r for r in tasks["prompts_train"] if r["task"] == "arithmetic"] if not corpus else []
    n_arith_docs = arithmetic_corpus_passes * -(-len(arith_train) // ARITHMETIC_LINES_PER_DOC)

    def pieces() -> Iterator[Piece]:  # a fresh pass over the corpus, then the solved arithmetic questions
        if not corpus:
            docs = _stdlib_pieces(seed, max_bytes)
        else:
            docs = iter_corpus(list(corpus), corpus_format, text_column, max_bytes=max_bytes, hf_split=hf_split,
                               doc_bytes=None if max_doc_mb is None else int(max_doc_mb * MB),
                               dropped=dropped)
        n = -1
        for p in docs:
            n = p.doc
            yield p
        for i, text in enumerate(arithmetic_documents(arith_train, arithmetic_corpus_passes, seed,
                                                      ARITHMETIC_LINES_PER_DOC)):
            yield Piece(n + 1 + i, f"arithmetic[{i}]", text, True)

    if tokenizer.get("path"):
        tok = load_tokenizer(tokenizer["path"], bos_token=tokenizer.get("bos_token"),
                             eos_token=tokenizer.get("eos_token"), pad_token=tokenizer.get("pad_token"))
    else:
        tok = train_tokenizer(_sample(pieces(), seed, val_fraction, int(tokenizer_sample_mb * MB)), vocab_size)
        dropped.clear()  # counted again by the tokenizing pass
    tok.save(tmp)
    total = corpus_bytes(list(corpus), corpus_format) if corpus else max_bytes
    if total is not None and max_bytes is not None:
        total = min(total, max_bytes)
    if total is not None:
        total += arithmetic_corpus_passes * sum(len(f"{r['prompt']} {r['answer']}\n") for r in arith_train)
    try:
        st = write_token_files(pieces(), tok.tok, tok.eos_id, tmp / "train.bin", tmp / "val.bin", seed=seed,
                               val_fraction=val_fraction, vocab_size=tok.vocab_size, progress=progress,
                               total_bytes=total)
    except ValueError as e:
        if not dropped:
            raise
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(dropped.items()))
        raise ValueError(f"{e}; documents dropped: {counts}") from e
    counts = st.counts[st.counts > 0]
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum())

    for name, rows in tasks.items():
        _write_jsonl(tmp / f"{name}.jsonl", rows)
    n_docs = st.train.docs + st.val.docs - n_arith_docs
    log.info("corpus: %d documents kept%s, %d documents of solved sums, %d + %d tokens (train + val), %.1f MB in "
             "%.1f s", n_docs, "".join(f", {n} dropped ({k})" for k, n in sorted(dropped.items())), n_arith_docs, st.train.tokens, st.val.tokens, (st.train.bytes + st.val.bytes) / MB, st.seconds)
    metrics = {
        "train_tokens": st.train.tokens, "val_tokens": st.val.tokens, "vocab_size": tok.vocab_size,
        "unigram_entropy_nats": entropy, "corpus_mb": (st.train.bytes + st.val.bytes) / MB,
        "corpus_docs": n_docs, "arithmetic_docs": n_arith_docs, **{f"corpus_docs_dropped_{k}": n for k, n in sorted(dropped.items())},
        **{f"n_{name}": len(tasks[name]) for name in sorted(tasks)}, **user_counts,
    }
    meta = {
        "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name,
        "eos_id": tok.eos_id, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "tokenizer": tokenizer.get("path") or "trained",
        "train_tokens": st.train.tokens, "val_tokens": st.val.tokens,
        "train_bytes": st.train.bytes, "val_bytes": st.val.bytes, "unigram_entropy_nats": entropy,
        "n_train_docs": st.train.docs, "n_val_docs": st.val.docs,
        "train_docs": st.train.names, "val_docs": st.val.names, "corpus_dropped": dict(sorted(dropped.items())),
        **{f"n_{name}": len(tasks[name]) for name in sorted(tasks)},
        "task_counts": {name: dict(sorted(Counter(r["task"] for r in rows).items()))
                        for name, rows in sorted(tasks.items())},
        "seed": seed,
    }
    write_json(tmp / "meta.json", meta)
    write_json(tmp / "metrics.json", metrics)
    return metrics


def _sample(pieces: Iterator[Piece], seed: int, val_fraction: float, max_bytes: int) -> Iterator[str]:
    """Texts of training documents (never held-out ones), in corpus order, up to about ``max_bytes``."""
    total = 0
    for p in pieces:
        if total >= max_bytes:
            return
        if not is_val_doc(p.doc, seed, val_fraction):
            total += len(p.text.encode("utf-8"))
            yield p.text


def iter_documents(bin_path: str | Path, eos_id: int, dtype: str = "uint16") -> Iterator[np.ndarray]:
    """Yield the token ids of each EOS-terminated document in a ``*.bin`` file (EOS excluded)."""
    arr = np.fromfile(bin_path, dtype=np.dtype(dtype).newbyteorder("<"))
    start = 0
    for end in np.flatnonzero(arr == eos_id):
        yield arr[start:end]
        start = end + 1
