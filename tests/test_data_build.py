"""Tests for the data stage (llmstages.data.build) on tiny real corpora."""

import hashlib
import json
import math
import re
import time
from collections import Counter

import numpy as np
import pytest

from llmstages.data.build import build_data, iter_documents
from llmstages.data.tasks import docstring_qa, explain_rows, first_sentence
from llmstages.data.tokens import is_val_doc
from llmstages.tokenizer import load_tokenizer

EOS_ID = 2  # of a tokenizer trained here

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 30,
    "b.txt": "def add(a, b):\n    return a + b\n\nprint(add(12, 30))\n" * 20,
    "c.txt": "Unicode text: café, naïve, 東京 and 🙂 emoji. " * 25,
    "sub/d.txt": "What's 7 + 8? It is 15. What's 9 - 4? It is 5.\n" * 20,
    "sub/e.txt": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 25,
    "sub/f.txt": "Numbers 0123456789 and more numbers 42 17 99.\n" * 20,
}
FILES = ["tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin", "meta.json", "metrics.json"] + [
    f"{k}_{s}.jsonl" for k in ("sft", "pref", "prompts") for s in ("train", "val")
]
KW = dict(vocab_size=300, arithmetic_max=5, val_fraction=0.3, progress=False)
ARITH = re.compile(r"What's (\d+) ([+-]) (\d+)\?")


def hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "data"
    metrics = build_data(out, corpus=[str(corpus / "*.txt"), str(corpus / "sub" / "**" / "*.txt")], **KW)
    return out, metrics


def test_files_meta_and_metrics(built, corpus):
    out, metrics = built
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    meta = json.loads((out / "meta.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == metrics
    train, val = np.fromfile(out / "train.bin", "<u2"), np.fromfile(out / "val.bin", "<u2")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == metrics["vocab_size"] == 300
    assert (meta["train_tokens"], meta["val_tokens"]) == (train.size, val.size)
    assert (metrics["train_tokens"], metrics["val_tokens"]) == (train.size, val.size)
    n_val = sum(is_val_doc(i, 1234, 0.3) for i in range(6))
    assert (meta["n_train_docs"], meta["n_val_docs"]) == (6 - n_val, n_val) and n_val >= 1
    total = sum(len(t.encode()) for t in DOCS.values())
    assert meta["train_bytes"] + meta["val_bytes"] == total
    assert metrics["corpus_mb"] == total / 1e6
    p = np.bincount(train, minlength=300) / train.size
    p = p[p > 0]
    assert metrics["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert 0 < metrics["unigram_entropy_nats"] < math.log(300)
    for k in ("sft", "pref", "prompts"):
        for s in ("train", "val"):
            assert metrics[f"n_{k}_{s}"] == meta[f"n_{k}_{s}"] == len(jsonl(out / f"{k}_{s}.jsonl"))


def test_tokens_decode_back_to_documents(built, corpus):
    out, _ = built
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    assert not set(meta["train_docs"]) & set(meta["val_docs"])
    assert sorted(meta["train_docs"] + meta["val_docs"]) == sorted(str(corpus / n) for n in DOCS)
    for split in ("train", "val"):
        arr = np.fromfile(out / f"{split}.bin", "<u2")
        assert int((arr == EOS_ID).sum()) == meta[f"n_{split}_docs"] and arr[-1] == EOS_ID
        decoded = [tok.decode(d.tolist()) for d in iter_documents(out / f"{split}.bin", EOS_ID)]
        expected = [(corpus / n).read_text(encoding="utf-8") for n in meta[f"{split}_docs"]]
        assert decoded == expected


def test_task_sets(built):
    out, _ = built
    for kind in ("sft", "pref", "prompts"):
        tr, va = jsonl(out / f"{kind}_train.jsonl"), jsonl(out / f"{kind}_val.jsonl")
        assert tr and va
        key = (lambda r: r["messages"][0]["content"]) if kind == "sft" else (
            lambda r: r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"])
        assert not {key(r) for r in tr} & {key(r) for r in va}, kind
    prompts = jsonl(out / "prompts_train.jsonl") + jsonl(out / "prompts_val.jsonl")
    arith = [r for r in prompts if r["task"] == "arithmetic"]
    assert len(arith) == 36 + 21 and len({r["prompt"] for r in prompts}) == len(prompts)
    assert {r["task"] for r in prompts} == {"arithmetic", "docstring", "explain"}
    for r in arith:
        a, op, b = ARITH.fullmatch(r["prompt"]).groups()
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert op == "+" or int(a) >= int(b)
    val = jsonl(out / "prompts_val.jsonl")
    assert Counter(r["task"] for r in val)["arithmetic"] == round(57 * 0.1)
    answers = {r["prompt"]: r["answer"] for r in prompts}
    technical = {r["prompt"]: r["rejected"] for r in explain_rows()}
    sft = jsonl(out / "sft_train.jsonl") + jsonl(out / "sft_val.jsonl")
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    qa = Counter((r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft if r["task"] != "explain")
    assert sorted(qa) == sorted((q, a) for q, a in answers.items() if q not in technical)
    train_q = {r["prompt"] for r in jsonl(out / "prompts_train.jsonl")}
    for (q, _), n in qa.items():  # small training sums (operands <= 20: all of them here) come 4 times
        assert n == (4 if q in train_q and ARITH.fullmatch(q) else 1), q
    explain_sft = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft if r["task"] == "explain"]
    # each explain prompt once with its simple answer and 3 times with its technical one
    assert Counter(explain_sft) == {**{(q, answers[q]): 1 for q in technical}, **{(q, t): 3 for q, t in technical.items()}}
    topics = {split: {r["topic"] for r in explain_rows() if r["prompt"] in
                      {x["prompt"] for x in jsonl(out / f"prompts_{split}.jsonl")}} for split in ("train", "val")}
    assert topics["val"] and not topics["train"] & topics["val"]  # explain prompts are held out by topic
    pref = jsonl(out / "pref_train.jsonl") + jsonl(out / "pref_val.jsonl")
    for r in pref:
        assert r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}]
        r["prompt"] = r["prompt"][0]["content"]
    per_q = Counter(r["prompt"] for r in pref)
    for r in pref:
        assert set(r) == {"prompt", "chosen", "rejected", "task"}
        assert r["chosen"] == answers[r["prompt"]] and r["rejected"] != r["chosen"]
        if r["task"] == "explain":
            assert r["rejected"] == technical[r["prompt"]]
        if r["task"] == "arithmetic":
            assert per_q[r["prompt"]] == 2 and int(r["rejected"]) >= 0
        else:
            assert per_q[r["prompt"]] == 1
    pairs = Counter((r["prompt"], r["rejected"]) for r in pref)
    assert max(pairs.values()) == 1  # the two arithmetic rejections differ


def test_byte_identical_rerun(built, corpus, tmp_path, caplog):
    out, metrics = built
    with caplog.at_level("INFO", logger="llmstages"):
        again = build_data(tmp_path / "again", corpus=[str(corpus / "*.txt"), str(corpus / "sub" / "**" / "*.txt")],
                           **{**KW, "progress": True})  # the progress bar does not change any output
    assert again == metrics
    lines = [r.getMessage() for r in caplog.records]  # each log call's arguments fit its format
    [corpus_line] = [ln for ln in lines if ln.startswith("corpus: ")]
    assert f"{metrics['train_tokens']} + {metrics['val_tokens']} tokens" in corpus_line
    assert hashes(tmp_path / "again") == hashes(out)


def test_docstring_helpers():
    assert first_sentence("Return the x.  More text.\n\nSecond para.", "f") == "Return the x."
    assert first_sentence("Split a path\ninto parts\n\nMore.", "f") == "Split a path into parts"
    assert first_sentence("f(a, b) -> int\n\nReturn a thing.", "f") is None
    assert first_sentence("Too short", "f") is None
    assert first_sentence("Use v1.2 of it. Then stop.", "f") == "Use v1.2 of it."
    qa = dict(docstring_qa())
    assert qa["What does json.dumps do?"] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert qa["What does math.sqrt do?"] == "Return the square root of x."
    assert list(qa) == list(dict(docstring_qa()))


def test_user_sft_and_preferences(corpus, tmp_path):
    sft = [{"prompt": f"q{i % 10}", "response": f"r{i}"} for i in range(20)]
    pref = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "task": "mine"} for i in range(10)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft) + "\n")
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    out = tmp_path / "out"
    m = build_data(out, corpus=[str(corpus / "*.txt")], sft={"path": str(tmp_path / "sft.jsonl")},
                   preference={"path": str(tmp_path / "pref.jsonl")}, **KW)
    tr, va = jsonl(out / "sft_train.jsonl"), jsonl(out / "sft_val.jsonl")
    assert (len(tr), len(va)) == (18, 2) == (m["n_sft_train"], m["n_sft_val"])  # 1 of 10 prompts, 2 rows each
    pairs = sorted((r["messages"][0]["content"], r["messages"][1]["content"]) for r in tr + va)
    assert pairs == sorted((r["prompt"], r["response"]) for r in sft)
    assert {r["task"] for r in tr + va} == {"user"}
    q = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(q(va)) == 1 and not q(tr) & q(va)
    ptr, pva = jsonl(out / "pref_train.jsonl"), jsonl(out / "pref_val.jsonl")
    assert (len(ptr), len(pva)) == (9, 1) and {r["task"] for r in ptr + pva} == {"mine"}
    assert m["n_prompts_train"] + m["n_prompts_val"] > 57  # RL prompts stay the verifiable defaults
    assert (m["sft_rows_read"], m["sft_rows_kept"], m["pref_rows_read"], m["pref_rows_kept"]) == (20, 20, 10, 10)


def test_user_sets_in_other_formats(corpus, tmp_path):
    """Alpaca as a JSON array with a system prompt, and implicit-prompt preference conversations."""
    alpaca = [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "twice", "output": str(i + 1)}
              for i in range(6)] + [{"instruction": "Empty.", "output": "  "}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    pref = [{"chosen": conv(f"q{i}", "yes"), "rejected": conv(f"q{i}", "no")} for i in range(5)]
    pref.append({"chosen": conv("same", "x"), "rejected": conv("same", "x")})
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    out = tmp_path / "out"
    m = build_data(out, corpus=[str(corpus / "*.txt")], sft={"path": str(tmp_path / "alpaca.json"),
                                                           "system_prompt": "Be exact."},
                   preference={"path": str(tmp_path / "pref.jsonl"), "format": "implicit"}, **KW)
    rows = jsonl(out / "sft_train.jsonl") + jsonl(out / "sft_val.jsonl")
    assert {"messages": [{"role": "system", "content": "Be exact."},
                         {"role": "user", "content": "Add 0 and 1.\n\ntwice"},
                         {"role": "assistant", "content": "1"}], "task": "user"} in rows
    assert (m["sft_rows_read"], m["sft_rows_kept"], m["sft_rows_dropped_empty_response"]) == (7, 6, 1)
    prefs = jsonl(out / "pref_train.jsonl") + jsonl(out / "pref_val.jsonl")
    assert sorted(r["prompt"][0]["content"] for r in prefs) == [f"q{i}" for i in range(5)]
    assert all((r["chosen"], r["rejected"], len(r["prompt"])) == ("yes", "no", 1) for r in prefs)
    assert (m["pref_rows_kept"], m["pref_rows_dropped_identical_responses"]) == (5, 1)


ALL_DROPPED = ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}\n'
               '{"messages": [{"role": "user", "content": "x"}]}\n')


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', r"bad\.jsonl:2: invalid JSON"),
        ('["prompt", "response"]\n', r"bad\.jsonl:1: row must be an object"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n',
         r"bad\.jsonl:3: missing field 'response'.*found \['prompt'\]"),
        ('{"prompt": "a", "response": 3}\n', r"bad\.jsonl:1: .*'response'.*string"),
        ("\n  \n", r"bad\.jsonl: empty file"),
        (ALL_DROPPED, r"bad\.jsonl: all 2 rows were dropped \(empty_response: 1, no_assistant_turn: 1\)"),
    ],
)
def test_bad_sft_file(corpus, tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        build_data(tmp_path / "out", corpus=[str(corpus / "*.txt")], sft={"path": str(tmp_path / "bad.jsonl")}, **KW)
    if "invalid JSON" in match:
        assert isinstance(e.value.__cause__, json.JSONDecodeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no out dir, no temp dir


def test_non_utf8_row_names_the_line(corpus, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8") as e:
        build_data(tmp_path / "out", corpus=[str(corpus / "*.txt")], sft={"path": str(tmp_path / "bad.jsonl")}, **KW)
    assert isinstance(e.value.__cause__, UnicodeDecodeError)
    assert not (tmp_path / "out").exists()


def test_bad_preference_file(corpus, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: missing field 'rejected'"):
        build_data(tmp_path / "out", corpus=[str(corpus / "*.txt")], preference={"path": str(tmp_path / "p.jsonl"),
                                                                                 "format": "explicit"}, **KW)


def test_bad_corpus_and_args(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        build_data(tmp_path / "o", corpus=[str(corpus / "*.txt"), str(tmp_path / "nothing-here*.txt")], **KW)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt"):
        build_data(tmp_path / "o", corpus=[str(corpus / "*.txt"), str(tmp_path / "latin1.txt")], **KW)
    with pytest.raises(ValueError, match="1048576"):
        build_data(tmp_path / "o", corpus=[str(corpus / "*.txt")], **{**KW, "vocab_size": 2_000_000})
    with pytest.raises(ValueError, match="at least 2|train"):
        build_data(tmp_path / "o", corpus=[str(corpus / "a.txt")], **KW)
    assert not (tmp_path / "o").exists()


def test_failure_keeps_existing_out_dir(built, corpus, tmp_path):
    out = tmp_path / "data"
    build_data(out, corpus=[str(corpus / "*.txt")], **KW)
    before = hashes(out)
    (tmp_path / "bad.jsonl").write_text("{oops}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        build_data(out, corpus=[str(corpus / "*.txt")], sft={"path": str(tmp_path / "bad.jsonl")}, **KW)
    with pytest.raises(ValueError, match=r"latin1\.txt"):
        (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe bad")
        build_data(out, corpus=[str(corpus / "*.txt"), str(tmp_path / "latin1.txt")], **KW)
    assert hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data", "latin1.txt"]
    # a successful rebuild with other settings replaces it completely
    build_data(out, corpus=[str(corpus / "*.txt")], **{**KW, "seed": 7})
    assert hashes(out) != before and sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_default_stdlib_corpus(tmp_path):
    t0 = time.perf_counter()
    m = build_data(tmp_path / "d", max_corpus_mb=0.5, vocab_size=512, arithmetic_corpus_passes=0, progress=False)
    assert time.perf_counter() - t0 < 20
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    names = meta["train_docs"] + meta["val_docs"]
    assert all(n.startswith(("stdlib/", "pydoc_topics/")) for n in names) and len(set(names)) == len(names)
    assert meta["n_val_docs"] >= 1 and not set(meta["train_docs"]) & set(meta["val_docs"])
    assert 0 < m["corpus_mb"] <= 0.5 and m["vocab_size"] == 512
    assert (meta["train_bytes"] + meta["val_bytes"]) / 1e6 == m["corpus_mb"]
    assert m["train_tokens"] > 0 and m["val_tokens"] > 0 and m["unigram_entropy_nats"] > 3
    assert m["n_prompts_train"] + m["n_prompts_val"] > 15_050  # 15,050 arithmetic + docstring + explain questions
    tok = load_tokenizer(tmp_path / "d")
    first = next(iter_documents(tmp_path / "d" / "val.bin", tok.eos_id))
    assert tok.decode(first.tolist()).encode()  # decodes to real text


def test_user_sft_with_a_single_prompt_is_refused(tmp_path):
    """One distinct prompt cannot be split into train and held-out: the data stage says so, writes nothing."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, some text for a tokenizer. " * 50)
    (tmp_path / "c2.txt").write_text("another document with words and 123 numbers. " * 50)
    sft = tmp_path / "one.jsonl"
    sft.write_text('{"prompt": "hi", "response": "there"}\n\n\n')
    with pytest.raises(ValueError, match=r"one\.jsonl: 1 distinct prompt\(s\); at least 2"):
        build_data(tmp_path / "out", corpus=[str(tmp_path / "c*.txt")], vocab_size=300, sft={"path": str(sft)},
                   progress=False)
    assert not (tmp_path / "out").exists()


def test_training_sums_are_in_the_default_corpus_and_held_out_ones_never(tmp_path):
    out = tmp_path / "d"
    m = build_data(out, max_corpus_mb=0.05, vocab_size=300, arithmetic_max=5, arithmetic_corpus_passes=2,
                   progress=False)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    text = "".join(tok.decode(d.tolist()) for split in ("train", "val")
                   for d in iter_documents(out / f"{split}.bin", tok.eos_id, meta["dtype"]))
    lines = Counter(line for line in text.splitlines() if line.startswith("What's ") and line.count("?") == 1
                    and ARITH.match(line))
    train = {f"{r['prompt']} {r['answer']}" for r in jsonl(out / "prompts_train.jsonl") if r["task"] == "arithmetic"}
    held_out = [r["prompt"] for r in jsonl(out / "prompts_val.jsonl") if r["task"] == "arithmetic"]
    assert set(lines) == train and set(lines.values()) == {2}  # every training sum, solved, once per pass
    assert held_out and not any(line.startswith(q + " ") for q in held_out for line in lines)
    names = meta["train_docs"] + meta["val_docs"]
    assert sum(n.startswith("arithmetic[") for n in names) == m["arithmetic_docs"] == 2  # 51 lines, 256 a document
    assert m["corpus_docs"] == len(names) - 2


def test_a_corpus_of_your_own_gets_no_sums(built):
    _, metrics = built
    assert metrics["arithmetic_docs"] == 0


def test_default_probe_sums_are_held_out():
    """The probe sums other than 2 + 2 (conf/probes/default.yaml) are held-out questions of the default data:
    in prompts_val, never in any training split, so the README's probe answers show generalisation."""
    from pathlib import Path

    import yaml

    from llmstages.data.build import _default_tasks
    from llmstages.data.tasks import ARITH_PROMPT

    conf = Path(__file__).resolve().parents[1] / "conf"
    data = yaml.safe_load((conf / "stage/data.yaml").read_text())
    probes = yaml.safe_load((conf / "probes/default.yaml").read_text())["prompts"]
    sums = [p for p in probes if ARITH_PROMPT.fullmatch(p) and p != "What's 2 + 2?"]
    assert len(sums) == 2
    tasks = _default_tasks(data["arithmetic_max"], data["seed"], data["heldout_fraction"])
    val = {r["prompt"] for r in tasks["prompts_val"]}
    train = {r["prompt"] for r in tasks["prompts_train"]} | {r["messages"][0]["content"] for r in tasks["sft_train"]}
    assert all(s in val and s not in train for s in sums)
