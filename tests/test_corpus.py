"""Streaming corpus readers (text, JSONL, parquet, Hugging Face) and token-file writing (llmstages.data.corpus)."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmstages.data.corpus import Piece, corpus_bytes, find_files, iter_corpus
from llmstages.data.tokens import is_val_doc, token_dtype, write_token_files

EOS = 2
SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's 1234 o'clock!\n"
    "def f(x):\n    return x + 42  # comment\n\n"
    "Ünïcödé text: café, naïve, 中文字符, emoji 😀.\r\n"
    "Numbers 3.14159 and 2718, tabs\tand  double  spaces \n"
)
# Places where a naive cut "after every newline followed by non-whitespace" would change the ids.
TRICKY = ["x \nA", "x \n1", "para\n\nNext", "line\r\nnext", "def g():\n    pass\n", "a  \n\tb", "end.\n\n\n7",
          "word \n 'quote'", "x\n½", "tab\t\nY", "<|eos|> after\n<|eos|>", "é \nü", "12 34\n56"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small byte-level BPE (individual digits + GPT-2 regex), built with ``tokenizers`` directly."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([SAMPLE * 3, *TRICKY], trainer=trainer)
    assert t.token_to_id("<|eos|>") == EOS
    return t


@pytest.fixture(scope="module")
def plain_tok(tok) -> Tokenizer:
    """``tok`` encoding special-token strings in text as plain text (so "<|eos|>" in a document is not EOS)."""
    t = Tokenizer.from_str(tok.to_str())
    t.encode_special_tokens = True
    return t


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def write(path, data: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


def docs_of(pieces) -> list[tuple[int, str, str]]:
    """``(doc, name, text)`` per document, checking that pieces are consecutive and end with last=True."""
    out: list[tuple[int, str, str]] = []
    cur: list[Piece] = []
    for p in pieces:
        if cur:
            assert p.doc == cur[0].doc and p.name == cur[0].name
        cur.append(p)
        if p.last:
            out.append((p.doc, p.name, "".join(q.text for q in cur)))
            cur = []
    assert cur == []
    return out


def split_docs(path, dtype) -> list[np.ndarray]:
    arr = np.fromfile(path, dtype=dtype)
    assert arr.size and arr[-1] == EOS
    return np.split(arr, np.flatnonzero(arr == EOS) + 1)[:-1]


# --------------------------------------------------------------------------- files
def test_find_files_order_dedup_hidden_and_errors(tmp_path):
    c = tmp_path / "corpus"
    for rel in ["b.txt", "a.txt", "sub/c.md", "a-b/d.txt", ".hidden.txt", ".git/x.txt", "sub/.cache/y.txt"]:
        write(c / rel, rel)
    extra = write(tmp_path / "extra.txt", "extra")
    got = find_files([str(extra), str(c), str(c / "**" / "*.txt"), str(tmp_path / "extra.txt")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "extra.txt", "corpus/a-b/d.txt", "corpus/a.txt", "corpus/b.txt", "corpus/sub/c.md"]
    # a glob alone: sorted matches, hidden names not matched by "*"
    got = find_files([str(c / "**" / "*.txt")])
    assert [p.relative_to(c).as_posix() for p in got] == ["a-b/d.txt", "a.txt", "b.txt"]
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.txt"):
        find_files([str(c), str(tmp_path / "nothing*.txt")])
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / ".only_hidden", "x")
    with pytest.raises(FileNotFoundError, match="empty"):
        find_files([str(tmp_path / "empty")])
    assert corpus_bytes([str(c)]) == sum(len(r) for r in ["b.txt", "a.txt", "sub/c.md", "a-b/d.txt"])
    assert corpus_bytes([str(c)], "hf") is None


def test_unknown_format_lists_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'csv'.*\['auto', 'text', 'jsonl', 'parquet', 'hf'\]"):
        iter_corpus([str(tmp_path)], fmt="csv")


def test_import_does_not_load_datasets_or_pyarrow():
    code = ("import sys, llmstages.data.corpus; "
            "print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- text
def test_text_files_one_document_each_in_pieces(tmp_path):
    write(tmp_path / "c/b.txt", "second\ndocument\n")
    write(tmp_path / "c/a.txt", "first")
    write(tmp_path / "c/blank.txt", " \n\t\n")
    write(tmp_path / "c/empty.txt", "")
    dropped = collections.Counter()
    pieces = list(iter_corpus([str(tmp_path / "c")], piece_bytes=4, dropped=dropped))
    assert docs_of(pieces) == [(0, str(tmp_path / "c/a.txt"), "first"), (1, str(tmp_path / "c/b.txt"),
                                                                         "second\ndocument\n")]
    assert [p.text for p in pieces if p.doc == 1] == ["second\n", "document\n"]
    assert dropped == {"empty": 2}


def test_text_pieces_give_the_ids_of_the_whole_file(tmp_path, tok):
    text = (SAMPLE + "".join(TRICKY)) * 4 + "no newline at all " * 30 + "end"
    path = write(tmp_path / "doc.txt", text)
    whole = ids(tok, text)
    for piece_bytes in (1, 2, 7, 16, 64, 1 << 20):
        pieces = list(iter_corpus([str(path)], piece_bytes=piece_bytes))
        assert "".join(p.text for p in pieces) == text
        assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
        if piece_bytes <= 64:
            assert len(pieces) > 10
        assert [i for p in pieces for i in ids(tok, p.text)] == whole, piece_bytes


def test_text_pieces_ids_fuzz(tmp_path, tok):
    atoms = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "a", "Bc", "word", "7", "42", "é", "中", "😀", "'s", ".", "!",
             "½", "\u00a0", "\x1c", "<|eos|>", "_", "(", "\u2028"]
    rng = random.Random(0)
    for trial in range(60):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(20, 120)))
        path = write(tmp_path / f"f{trial}.txt", text)
        pieces = list(iter_corpus([str(path)], piece_bytes=rng.randint(1, 12)))
        if not text.strip():
            assert pieces == []
            continue
        assert "".join(p.text for p in pieces) == text
        assert [i for p in pieces for i in ids(tok, p.text)] == ids(tok, text), repr(text)


def test_multibyte_characters_across_blocks(tmp_path):
    text = "é中😀\n" * 50 + "ü"
    path = write(tmp_path / "u.txt", text)
    for piece_bytes in (1, 2, 3, 5):
        assert "".join(p.text for p in iter_corpus([str(path)], piece_bytes=piece_bytes)) == text


def test_text_not_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.txt", "line one\nline two é\nline \xff three\n".encode("latin-1"))
    for piece_bytes in (3, 1 << 20):
        with pytest.raises(ValueError, match=r"bad\.txt:2: not valid UTF-8"):
            list(iter_corpus([str(path)], piece_bytes=piece_bytes))
    path = write(tmp_path / "cut.txt", b"ok\n\xe4\xb8")  # a truncated character at the end of the file
    with pytest.raises(ValueError, match=r"cut\.txt:2: not valid UTF-8"):
        list(iter_corpus([str(path)], piece_bytes=1))


# --------------------------------------------------------------------------- rows
def test_jsonl_custom_column_and_dropped(tmp_path):
    rows = [{"body": "one", "x": 1}, {"body": "   "}, {"body": "two\nlines"}, {"body": ""}, {"body": "three"}]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    dropped = collections.Counter()
    got = docs_of(iter_corpus([str(path)], text_column="body", dropped=dropped))
    assert got == [(0, f"{path}:1", "one"), (1, f"{path}:3", "two\nlines"), (2, f"{path}:5", "three")]
    assert dropped == {"empty": 2}
    # .json array and .ndjson by extension, fmt="jsonl" for another extension
    arr = write(tmp_path / "a.json", json.dumps([{"text": "A"}, {"text": "B"}]))
    nd = write(tmp_path / "b.ndjson", '{"text": "C"}\n')
    other = write(tmp_path / "c.data", '{"text": "D"}\n')
    assert [d[1:] for d in docs_of(iter_corpus([str(arr), str(nd)]))] == [
        (f"{arr}[0]", "A"), (f"{arr}[1]", "B"), (f"{nd}:1", "C")]
    assert docs_of(iter_corpus([str(other)], fmt="jsonl")) == [(0, f"{other}:1", "D")]


def test_jsonl_errors(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"body": "ok"}\n{"text": "no body", "id": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'body' .*found \['id', 'text'\]"):
        list(iter_corpus([str(path)], text_column="body"))
    path = write(tmp_path / "e.jsonl", '{"text": "ok"}\n\n{"text": ["not", "a", "string"]}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:3: field 'text' must be a string, got list"):
        list(iter_corpus([str(path)]))
    path = write(tmp_path / "f.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"f\.jsonl:2: invalid JSON"):
        list(iter_corpus([str(path)]))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"id": list(range(6)), "content": ["alpha", None, "beta\ngamma", " ", "délta", "eps"]})
    pq.write_table(table, path, row_group_size=4)
    dropped = collections.Counter()
    got = docs_of(iter_corpus([str(tmp_path)], text_column="content", dropped=dropped, piece_bytes=2))
    assert got == [(0, f"{path}:row 0", "alpha"), (1, f"{path}:row 2", "beta\ngamma"),
                   (2, f"{path}:row 4", "délta"), (3, f"{path}:row 5", "eps")]
    assert dropped == {"empty": 2}
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text' \(columns: \['id', 'content'\]\)"):
        list(iter_corpus([str(path)]))
    with pytest.raises(ValueError, match=r"column 'id' must hold strings, got int64"):
        list(iter_corpus([str(path)], text_column="id"))


def test_huggingface_saved_folders_and_data_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a doc", None, "another doc"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    dropped = collections.Counter()
    got = docs_of(iter_corpus([str(tmp_path / "saved")], fmt="hf", dropped=dropped))
    assert got == [(0, f"hf:{tmp_path / 'saved'}[0]", "a doc"), (1, f"hf:{tmp_path / 'saved'}[2]", "another doc")]
    assert dropped == {"empty": 1}

    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    got = docs_of(iter_corpus([str(tmp_path / "dict")], fmt="hf", hf_split="validation"))
    assert got == [(0, f"hf:{tmp_path / 'dict'}[0]", "held out")]
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        list(iter_corpus([str(tmp_path / "dict")], fmt="hf", hf_split="test"))
    with pytest.raises(ValueError, match=r"saved: no column 'body' \(columns: \['text', 'n'\]\)"):
        list(iter_corpus([str(tmp_path / "saved")], fmt="hf", text_column="body"))

    files = tmp_path / "files"
    write(files / "a.jsonl", '{"body": "from json"}\n{"body": "  "}\n')
    write(files / "b.jsonl", '{"body": "second file"}\n')
    got = docs_of(iter_corpus([str(files)], fmt="hf", text_column="body"))
    assert got == [(0, f"hf:{files}[0]", "from json"), (1, f"hf:{files}[2]", "second file")]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        list(iter_corpus([str(files / "a.jsonl")], fmt="hf"))
    # a saved folder then a data file: documents numbered across patterns; the cap counts UTF-8 bytes
    c = write(tmp_path / "c.jsonl", '{"text": "third"}\n{"text": "fourth"}\n')
    got = docs_of(iter_corpus([str(tmp_path / "saved"), str(c)], fmt="hf", max_bytes=21))
    assert got == [(0, f"hf:{tmp_path / 'saved'}[0]", "a doc"), (1, f"hf:{tmp_path / 'saved'}[2]", "another doc"),
                   (2, f"hf:{c}[0]", "third")]


# --------------------------------------------------------------------------- max_bytes
def test_doc_bytes_splits_a_long_text_file_into_documents_at_line_ends(tmp_path, tok):
    lines = [f"Line {i:03d}: some words of the book.\n" for i in range(300)]  # 35 bytes each
    text = "".join(lines[:150]) + "\n \n" + "".join(lines[150:])
    book = write(tmp_path / "book.txt", text)
    docs = docs_of(iter_corpus([str(book)], doc_bytes=1000))  # read in pieces of 125 bytes
    assert [d[0] for d in docs] == list(range(len(docs))) and len(docs) == 10  # 10,503 bytes in 1,000-1,125
    assert [d[1] for d in docs] == [f"{book}#{k}" for k in range(len(docs))]
    assert "".join(d[2] for d in docs) == text  # nothing lost or repeated
    assert all(1000 <= len(d[2]) <= 1125 for d in docs[:-1]) and 0 < len(docs[-1][2]) <= 1125
    assert all(d[2].endswith("\n") and not d[2][0].isspace() for d in docs)  # cut after a whole line
    # the ids of the parts are the ids of the file (the cuts are the pieces' safe cuts)
    assert [i for d in docs for i in ids(tok, d[2])] == ids(tok, text)
    # one document per file without it; a long whitespace run stays with the document before it
    assert len(docs_of(iter_corpus([str(book)]))) == 1
    write(tmp_path / "gap.txt", "first part\n" + " \n" * 50 + "last part\n")
    assert [d[2].strip() for d in docs_of(iter_corpus([str(tmp_path / "gap.txt")], doc_bytes=20))] == [
        "first part", "last part"]
    with pytest.raises(ValueError, match=r"doc_bytes=0 must be >= 1"):
        iter_corpus([str(book)], doc_bytes=0)


def test_max_bytes_stops_before_the_document_that_would_exceed(tmp_path):
    for name, size in (("a", 10), ("b", 20), ("c", 30)):
        write(tmp_path / f"t/{name}.txt", "x" * size)
    texts = lambda **kw: [d[2] for d in docs_of(iter_corpus([str(tmp_path / "t")], **kw))]  # noqa: E731
    assert [len(t) for t in texts(max_bytes=59)] == [10, 20]
    assert [len(t) for t in texts(max_bytes=60)] == [10, 20, 30]
    assert [len(t) for t in texts(max_bytes=1)] == [10]  # always at least one document
    assert len(texts(max_bytes=None)) == 3
    path = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in ["é" * 3, "ab", "cd", "e"]))
    got = [d[2] for d in docs_of(iter_corpus([str(path)], max_bytes=9))]
    assert got == ["ééé", "ab"]  # 6 + 2 bytes; "cd" would make 10


# --------------------------------------------------------------------------- token files
def test_token_dtype_and_val_split():
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**32) == np.dtype("<u4")
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(2**32 + 1)
    assert is_val_doc(0, seed=1, fraction=0.0) and is_val_doc(0, seed=7, fraction=0.5)
    assert not any(is_val_doc(d, seed=1, fraction=0.0) for d in range(1, 1000))
    assert all(is_val_doc(d, seed=1, fraction=1.0) for d in range(1, 1000))
    a = [is_val_doc(d, seed=3, fraction=0.1) for d in range(10_000)]
    assert a == [is_val_doc(d, seed=3, fraction=0.1) for d in range(10_000)]
    assert a != [is_val_doc(d, seed=4, fraction=0.1) for d in range(10_000)]
    assert 900 < sum(a) < 1100


def make_corpus(tmp_path) -> tuple[list[str], list[str]]:
    """Text files (multi-piece) and JSONL rows; returns (patterns, document texts in order)."""
    texts = []
    for i in range(12):
        t = f"Document {i}.\n" + (SAMPLE if i % 2 else "".join(TRICKY)) * (1 + i % 3)
        write(tmp_path / f"corpus/t{i:02d}.txt", t)
        texts.append(t)
    rows = [f"row {i}: {SAMPLE[: 20 + 7 * i]}" for i in range(25)]
    write(tmp_path / "corpus/z.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in rows))
    return [str(tmp_path / "corpus")], texts + rows


def test_write_token_files_round_trip(tmp_path, plain_tok):
    patterns, texts = make_corpus(tmp_path)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    stats = write_token_files(iter_corpus(patterns, piece_bytes=32), plain_tok, EOS, train, val, seed=5,
                              val_fraction=0.25, vocab_size=plain_tok.get_vocab_size(), chunk_bytes=300, progress=False,
                              total_bytes=corpus_bytes(patterns))
    in_val = [is_val_doc(d, 5, 0.25) for d in range(len(texts))]
    want_val = [t for t, v in zip(texts, in_val) if v]
    want_train = [t for t, v in zip(texts, in_val) if not v]
    assert 0 < len(want_val) < len(want_train)
    got_train = [plain_tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in split_docs(train, np.uint16)]
    got_val = [plain_tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in split_docs(val, np.uint16)]
    assert got_train == want_train and got_val == want_val
    # the ids are exactly those of encoding each whole document (pieces and chunks do not change them)
    assert np.fromfile(train, np.uint16).tolist() == [i for t in want_train for i in [*ids(plain_tok, t), EOS]]
    names = [str(tmp_path / f"corpus/t{i:02d}.txt") for i in range(12)]
    names += [f"{tmp_path / 'corpus/z.jsonl'}:{i + 1}" for i in range(25)]
    assert stats.val.names == [n for n, v in zip(names, in_val) if v]
    assert stats.train.names == [n for n, v in zip(names, in_val) if not v]
    assert (stats.train.docs, stats.val.docs) == (len(want_train), len(want_val))
    assert stats.train.tokens == train.stat().st_size // 2 and stats.val.tokens == val.stat().st_size // 2
    assert stats.train.bytes == sum(len(t.encode()) for t in want_train)
    assert stats.val.bytes == sum(len(t.encode()) for t in want_val)
    assert stats.counts.shape == (plain_tok.get_vocab_size(),)
    assert stats.counts.tolist() == np.bincount(np.fromfile(train, np.uint16), minlength=400).tolist()
    assert stats.seconds > 0

    # uint32 token files: same ids, 4 bytes each
    train32, val32 = tmp_path / "train32.bin", tmp_path / "val32.bin"
    stats32 = write_token_files(iter_corpus(patterns), plain_tok, EOS, train32, val32, seed=5, val_fraction=0.25,
                                vocab_size=70000, progress=True)
    assert train32.stat().st_size == 4 * stats32.train.tokens == 4 * stats.train.tokens
    assert np.fromfile(train32, "<u4").tolist() == np.fromfile(train, "<u2").tolist()
    assert np.fromfile(val32, "<u4").tolist() == np.fromfile(val, "<u2").tolist()
    assert stats32.counts.shape == (70000,) and stats32.counts[:400].tolist() == stats.counts.tolist()


def test_write_token_files_errors(tmp_path, tok):
    one = write(tmp_path / "one.txt", "a single document")
    kw = dict(seed=0, val_fraction=0.1, vocab_size=tok.get_vocab_size(), progress=False)
    with pytest.raises(ValueError, match=r"need at least 2 documents .* got 1 \(.*one.txt; .*data\.max_doc_mb=0\.05"):
        write_token_files(iter_corpus([str(one)]), tok, EOS, tmp_path / "t.bin", tmp_path / "v.bin", **kw)
    with pytest.raises(ValueError, match=r"token id \d+ >= vocab_size=300"):
        write_token_files(iter_corpus([str(tmp_path / "one.txt")]), tok, EOS, tmp_path / "t.bin",
                          tmp_path / "v.bin", **{**kw, "vocab_size": 300})
    # an error of the corpus reader (after some chunks were written) reaches the caller
    write(tmp_path / "c/a.txt", "fine text\n" * 100)
    write(tmp_path / "c/b.txt", b"broken \xff\n")
    with pytest.raises(ValueError, match=r"b\.txt:1: not valid UTF-8"):
        write_token_files(iter_corpus([str(tmp_path / "c")], piece_bytes=16), tok, EOS, tmp_path / "t.bin",
                          tmp_path / "v.bin", chunk_bytes=32, **kw)
    with pytest.raises(ValueError, match=r"val_fraction=1"):
        write_token_files(iter_corpus([str(one)]), tok, EOS, tmp_path / "t.bin", tmp_path / "v.bin",
                          **{**kw, "val_fraction": 1})
