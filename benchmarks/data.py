"""Benchmark: stream-tokenize a synthetic pretraining corpus into token files (llmstages.data.corpus).

Generates a corpus of at least ``--gb`` GB (10**9 bytes on disk) of JSONL rows or text files (Zipf-distributed
words from a generated vocabulary, capitalised sentences, punctuation, numbers, newlines, some accented and
CJK words), trains a byte-level BPE on a ~5 MB sample (``tokenizers``, vocab 4096 by default), then runs
``iter_corpus`` + ``write_token_files`` over the whole corpus and prints the machine, the corpus size,
seconds, MB/s, tokens/s, tokens produced and the peak memory, with PASS/FAIL against "peak memory < 2 GB".

Generation is vectorised (numpy gathers from a string table, written in blocks of ~8 MB), so it is fast and
never holds the corpus in memory.

Example::

    python benchmarks/data.py --gb 0.05            # quick check
    python benchmarks/data.py                      # 1 GB of JSONL
    python benchmarks/data.py --format text --keep --dir /data/bench
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from llmstages.data.corpus import corpus_bytes, iter_corpus
from llmstages.data.tokens import token_dtype, write_token_files
from llmstages.tokenizer import ChatTokenizer, train_tokenizer

GB = 10**9
MB = 10**6
LIMIT_MB = 2000  # "peak memory < 2 GB"
ZIPF_POOL = 1 << 22  # word ids drawn from a pool where each word appears in proportion to its Zipf weight
LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
LETTER_P = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                     1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
ACCENTED = "éèàüöäñçß"
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"
# Separators after a word, their weights, and whether the next word starts a sentence. "\n" is written as the
# two characters backslash-n in JSONL (an escaped newline inside the JSON string).
SEPARATORS = [(" ", 80.0, False), (", ", 7.0, False), (". ", 6.0, True), ("; ", 0.7, False), (": ", 0.5, False),
              ("? ", 0.6, True), ("! ", 0.4, True), (" - ", 0.5, False), (".\n", 1.5, True), ("\n", 0.3, True)]

_w = np.array([w for _, w, _ in SEPARATORS])
SEP_POOL = np.repeat(np.arange(len(SEPARATORS)), np.round(_w / _w.sum() * 10_000).astype(int))  # by weight


# --------------------------------------------------------------------------- synthetic corpus
def make_table(rng: np.random.Generator, n_words: int, fmt: str) -> dict:
    """String table for the generator: words, their capitalised forms, numbers, separators, document breaks.

    Returns a dict with the concatenated UTF-8 ``bytes`` (uint8), ``start``/``length`` per entry and the id
    ranges of each kind.
    """
    lengths = np.clip(rng.poisson(5.0, n_words) + 1, 1, 14)
    letters = LETTERS[rng.choice(26, size=int(lengths.sum()), p=LETTER_P / LETTER_P.sum())].tobytes().decode()
    ends = np.cumsum(lengths)
    words: list[str] = []
    for a, b, n, r in zip(ends - lengths, ends, lengths, rng.random(n_words)):
        w = letters[a:b]
        if r < 0.03:
            w = w[:-1] + ACCENTED[rng.integers(len(ACCENTED))]
        elif r < 0.04:
            w = "".join(CJK[i] for i in rng.integers(len(CJK), size=min(n, 3)))
        words.append(w)
    caps = [w[:1].upper() + w[1:] for w in words]
    ranks = np.arange(1, n_words + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.07)  # Zipf: a pool of word ids with each word's share, sampled uniformly later
    pool = np.searchsorted(cdf, (np.arange(ZIPF_POOL) + 0.5) / ZIPF_POOL * cdf[-1]).astype(np.int32)
    numbers = [str(x) for x in rng.integers(0, 100, 300)] + [str(x) for x in rng.integers(1800, 2030, 200)]
    numbers += [f"{x:,}" for x in rng.integers(1000, 10**7, 300)] + [f"{x:.2f}" for x in rng.random(200) * 100]
    newline = "\\n" if fmt == "jsonl" else "\n"
    seps = [s.replace("\n", newline) for s, _, _ in SEPARATORS]
    doc_break = '."}\n{"text": "' if fmt == "jsonl" else "." + newline * 2  # text: a paragraph break
    entries = words + caps + numbers + seps + [doc_break]
    enc = [e.encode() for e in entries]
    length = np.array([len(e) for e in enc], dtype=np.int32)
    return {
        "bytes": np.frombuffer(b"".join(enc), dtype=np.uint8), "length": length,
        "start": np.cumsum(length) - length, "n_words": n_words, "caps": n_words,
        "numbers": 2 * n_words, "n_numbers": len(numbers), "seps": 2 * n_words + len(numbers),
        "doc_break": len(entries) - 1, "zipf_pool": pool,
    }


def gen_block(rng: np.random.Generator, table: dict, n: int, mean_doc_words: float) -> tuple[np.ndarray, int]:
    """``n`` words with separators, as UTF-8 bytes, ending with a document break; returns (bytes, documents)."""
    t = table
    words = t["zipf_pool"][rng.integers(ZIPF_POOL, size=n)]
    numbers = rng.random(n) < 0.03
    words[numbers] = t["numbers"] + rng.integers(t["n_numbers"], size=int(numbers.sum()))
    seps = SEP_POOL[rng.integers(SEP_POOL.size, size=n)]
    starts = np.array([s for _, _, s in SEPARATORS])[seps]
    # document lengths (lognormal, in words) filling the block; the last document ends with the block
    doc_len = np.maximum(1, rng.lognormal(np.log(mean_doc_words) - 0.5, 1.0, size=n // 8 + 2).astype(np.int64))
    ends = np.cumsum(doc_len)
    ends = ends[ends < n] - 1
    ends = np.append(ends, n - 1)
    sep_ids = t["seps"] + seps
    sep_ids[ends] = t["doc_break"]
    starts[ends] = True
    cap = np.concatenate([[True], starts[:-1]]) & (words < t["n_words"])
    words[cap] += t["caps"]
    toks = np.empty(2 * n, dtype=np.int32)
    toks[0::2], toks[1::2] = words, sep_ids
    lens = t["length"][toks]
    out_start = np.cumsum(lens, dtype=np.int32) - lens  # a block is far below 2**31 bytes
    idx = np.repeat(t["start"][toks] - out_start, lens)
    idx += np.arange(idx.size, dtype=np.int32)
    return t["bytes"][idx], len(ends)


def generate(out: Path, gb: float, fmt: str, seed: int, file_mb: float, mean_doc_words: float) -> tuple[int, int]:
    """Write the corpus into ``out``; returns (bytes on disk, documents). JSONL: one row per document;
    text: one document per file of about ``file_mb`` MB."""
    rng = np.random.default_rng(seed)
    table = make_table(rng, 30_000, fmt)
    target, written, docs, i = int(gb * GB), 0, 0, 0
    block_words = 400_000  # ~3 MB per block
    while written < target:
        path = out / (f"part-{i:05d}.jsonl" if fmt == "jsonl" else f"doc-{i:05d}.txt")
        with open(path, "wb") as f:
            f.write(b'{"text": "' if fmt == "jsonl" else b"")
            n_file = 0
            while n_file < file_mb * MB and written + n_file < target:
                block, n_docs = gen_block(rng, table, block_words, mean_doc_words)
                if fmt == "text":  # the block's document breaks are paragraph breaks: one file = one document
                    n_docs = 0
                f.write(block.tobytes())
                n_file += block.size
                docs += n_docs
            if fmt == "jsonl":  # the last block ended with '."}\n{"text": "': close that last open row
                f.seek(-len('{"text": "'), os.SEEK_END)
                f.truncate()
                n_file -= len('{"text": "')
            else:
                docs += 1
        written += n_file
        i += 1
    return sum(p.stat().st_size for p in out.iterdir()), docs


# --------------------------------------------------------------------------- measuring
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) * 1024 for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal"))
        ram = f"{mem / 2**30:.1f} GiB RAM"
    except (OSError, StopIteration):
        ram = "RAM unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {os.cpu_count()} cores ({usable} usable), {ram}, {platform.system()} {platform.release()}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss), in MB (10**6 bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r * 1024 / MB


class RssSampler:
    """Peak RSS seen by polling psutil every 50 ms during a phase (None when psutil is missing)."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.proc = None
            return
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.05)

    def __enter__(self):
        if self.proc:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.stop.set()
            self.thread.join()

    @property
    def peak_mb(self) -> float | None:
        return self.peak / MB if self.proc else None


def train_sample_tokenizer(corpus: Path, fmt: str, vocab_size: int, sample_mb: float) -> ChatTokenizer:
    """The data stage's byte-level BPE (llmstages.tokenizer.train_tokenizer) on the first ``sample_mb`` MB."""

    def sample():  # pieces (rows, or parts of text files) until sample_mb
        n = 0
        for p in iter_corpus([str(corpus)], fmt):
            yield p.text
            n += len(p.text.encode())
            if n >= sample_mb * MB:
                return

    return train_tokenizer(sample(), vocab_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size to generate, in GB (10**9 bytes; default 1)")
    ap.add_argument("--format", choices=["jsonl", "text"], default="jsonl",
                    help="jsonl: files of ~--file-mb MB, one document per row (default); "
                         "text: one document per file of ~--file-mb MB")
    ap.add_argument("--file-mb", type=float, default=64.0,
                    help="size of each generated file in MB (default 64; at most 1/8 of the corpus)")
    ap.add_argument("--doc-words", type=float, default=500.0, help="mean JSONL document length in words (500)")
    ap.add_argument("--dir", type=Path, default=None, help="parent folder for the corpus (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and token files")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default 4096)")
    ap.add_argument("--sample-mb", type=float, default=5.0, help="tokenizer training sample in MB (default 5)")
    ap.add_argument("--chunk-mb", type=float, default=8.0, help="text MB encoded per batch (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmstages-bench-", dir=args.dir))
    corpus = work / "corpus"
    corpus.mkdir()
    try:
        print(f"machine:   {machine()}")
        print(f"python:    {platform.python_version()}, numpy {np.__version__}, "
              f"tokenizers {__import__('tokenizers').__version__}")
        t0 = time.perf_counter()
        file_mb = min(args.file_mb, args.gb * GB / MB / 8)  # text: at least 8 documents
        size, docs = generate(corpus, args.gb, args.format, args.seed, file_mb, args.doc_words)
        gen_s = time.perf_counter() - t0
        n_files = len(list(corpus.iterdir()))
        print(f"generated: {size / GB:.3f} GB, {docs:,} documents, {n_files} {args.format} files in {corpus} "
              f"({gen_s:.1f} s, {size / MB / gen_s:.0f} MB/s); peak RSS so far {peak_rss_mb():.0f} MB")

        t0 = time.perf_counter()
        tok = train_sample_tokenizer(corpus, args.format, args.vocab_size, args.sample_mb)
        print(f"tokenizer: vocab {tok.vocab_size} trained on ~{args.sample_mb:g} MB in "
              f"{time.perf_counter() - t0:.1f} s; peak RSS so far {peak_rss_mb():.0f} MB")

        pieces = iter_corpus([str(corpus)], args.format)
        with RssSampler() as sampler:
            stats = write_token_files(pieces, tok.tok, tok.eos_id, work / "train.bin", work / "val.bin",
                                      seed=args.seed, val_fraction=0.05, vocab_size=tok.vocab_size,
                                      chunk_bytes=int(args.chunk_mb * MB), progress=not args.no_progress,
                                      total_bytes=corpus_bytes([str(corpus)], args.format))
        s = stats.seconds
        text_bytes = stats.train.bytes + stats.val.bytes
        tokens = stats.train.tokens + stats.val.tokens
        on_disk = (work / "train.bin").stat().st_size + (work / "val.bin").stat().st_size
        assert on_disk == tokens * token_dtype(tok.vocab_size).itemsize
        peak = peak_rss_mb()
        print("--- tokenize (iter_corpus + write_token_files) ---")
        print(f"corpus:    {size / GB:.3f} GB on disk, {text_bytes / GB:.3f} GB of text, "
              f"{stats.train.docs + stats.val.docs:,} documents ({stats.train.docs:,} train, {stats.val.docs:,} val)")
        print(f"time:      {s:.1f} s")
        print(f"speed:     {size / MB / s:.1f} MB/s on disk, {text_bytes / MB / s:.1f} MB/s of text, "
              f"{tokens / s / 1e6:.2f} M tokens/s")
        print(f"tokens:    {tokens:,} ({stats.train.tokens:,} train, {stats.val.tokens:,} val), "
              f"{text_bytes / tokens:.2f} bytes/token, token files {on_disk / MB:.0f} MB")
        sampled = sampler.peak_mb
        print(f"memory:    peak RSS {peak:.0f} MB (ru_maxrss, whole run)"
              + (f", {sampled:.0f} MB while tokenizing (psutil, sampled every 50 ms)" if sampled else ""))
        ok = peak < LIMIT_MB
        print(f"{'PASS' if ok else 'FAIL'}: peak memory {peak:.0f} MB {'<' if ok else '>='} {LIMIT_MB} MB (2 GB)")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept:      {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
