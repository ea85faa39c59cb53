"""Users' own data, through configuration alone: each corpus, tokenizer, SFT and preference format trains its stage.

Each test writes a small fixture file, runs the data stage with Hydra overrides (real composition of conf/), then
the matching training stage for two steps on the tiny pipeline's models, and checks the counts and values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAST, compose
from llmstages.cli import run_stage
from llmstages.tokenizer import load_tokenizer

DOCS = [f"Document {i}: the quick brown fox {i * 7} jumps over the lazy dog. " * (3 + i % 4) for i in range(24)]
DATA = ["vocab_size=300", "arithmetic_max=3", "val_fraction=0.2"]
SFT = ["batch_size=4", "max_len=64", "eval_limit=4", "eval_max_new_tokens=4", "trainer.max_steps=2",
       "trainer.val_check_interval=2", "optim.warmup_steps=1", *FAST]
REWARD = ["batch_size=4", "max_len=64", "trainer.max_steps=2", "trainer.val_check_interval=2",
          "optim.warmup_steps=1", *FAST]
PRETRAIN = ["model=tiny", "batch_size=4", "seq_len=32", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "optim.warmup_steps=1", *FAST]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def work(tiny_run, monkeypatch, tmp_path):
    """The tiny pipeline's folder as the working directory (its outputs/pretrain and outputs/sft are reused)."""
    monkeypatch.chdir(tiny_run[0])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(DOCS):
        (corpus / f"doc{i:02d}.txt").write_text(d)
    return tmp_path


def data_stage(name: str, overrides: list[str], corpus: str) -> tuple[str, dict]:
    out = f"outputs/data-{name}"
    return out, run_stage("data", compose("data", [*DATA, f"data.corpus=[{corpus}]", *overrides]), out, "test")


def conv(*turns, sharegpt=False):
    roles = ("human", "gpt") if sharegpt else ("user", "assistant")
    key = ("from", "value") if sharegpt else ("role", "content")
    return [{key[0]: roles[i % 2], key[1]: t} for i, t in enumerate(turns)]


SFT_CASES = {
    # format -> (rows, extra overrides, rows read, rows kept)
    "prompt_completion": ([{"question": f"What's {i} + 1?", "answer": str(i + 1)} for i in range(12)],
                          ["data.sft.columns={prompt: question, completion: answer}"], 12, 12),
    "prompt_response": ([{"prompt": f"Say {i}.", "response": str(i)} for i in range(10)] +
                        [{"prompt": "Say nothing.", "response": " "}], [], 11, 10),
    "alpaca": ([{"instruction": f"Add one to {i}.", "input": "" if i % 2 else "Be brief.", "output": str(i + 1)}
                for i in range(10)], ["data.sft.format=alpaca"], 10, 10),
    "messages": ([{"messages": conv(f"Hi {i}", "Hello", "2 + 2?", "4")} for i in range(10)] +
                 [{"messages": conv("no answer")}], ["data.sft.system_prompt='Be exact.'"], 11, 10),
    "sharegpt": ([{"conversations": conv(f"Name {i}?", f"It is {i}.", sharegpt=True)} for i in range(10)], [], 10,
                 10),
}


@pytest.mark.parametrize("fmt", list(SFT_CASES))
def test_sft_formats_train_through_config(work, fmt):
    rows, extra, read, kept = SFT_CASES[fmt]
    path = work / ("sft.json" if fmt == "alpaca" else "sft.jsonl")
    path.write_text(json.dumps(rows)) if fmt == "alpaca" else write_jsonl(path, rows)
    data_dir, dm = data_stage(f"sft-{fmt}", [f"data.sft.path={path}", *extra], work / "corpus")
    assert (dm["sft_rows_read"], dm["sft_rows_kept"]) == (read, kept)
    assert dm["n_sft_train"] + dm["n_sft_val"] == kept
    first = json.loads(open(f"{data_dir}/sft_train.jsonl").readline())
    assert first["messages"][-1]["role"] == "assistant"
    if fmt == "messages":
        assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    m = run_stage("sft", compose("sft", [*SFT, f"data_dir={data_dir}"]), f"outputs/sft-{fmt}", "test")
    assert m["train_rows_kept"] == dm["n_sft_train"] and np.isfinite(m["val_loss"])


def test_sft_packing_trains_and_counts(work):
    rows = [{"messages": conv(f"Hi {i}", "Hello", "2 + 2?", "4")} for i in range(20)]
    data_dir, _ = data_stage("sft-pack", [f"data.sft.path={write_jsonl(work / 's.jsonl', rows)}"], work / "corpus")
    plain = run_stage("sft", compose("sft", [*SFT, f"data_dir={data_dir}"]), "outputs/sft-plain", "test")
    packed = run_stage("sft", compose("sft", [*SFT, f"data_dir={data_dir}", "packing=true"]), "outputs/sft-pack",
                       "test")
    assert packed["train_examples"] == plain["train_examples"] == plain["train_sequences"]
    n = len(load_tokenizer("outputs/sft").encode_chat(rows[0]["messages"])[0])  # every example has n tokens
    assert packed["train_sequences"] == -(-plain["train_examples"] // (64 // n))
    assert np.isfinite(packed["val_loss"]) and packed["train_tokens"] == plain["train_tokens"]


PREF_CASES = {
    "explicit": [{"prompt": f"What's {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(10)],
    "ultrafeedback": [{"prompt": f"Q{i}?", "chosen": conv(f"Q{i}?", "right"), "rejected": conv(f"Q{i}?", "wrong")}
                      for i in range(10)],
    "implicit": [{"chosen": conv("Hi", "Hello", f"Q{i}?", "yes"), "rejected": conv("Hi", "Hello", f"Q{i}?", "no")}
                 for i in range(10)],
    "hh": [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: no"}
           for i in range(10)],
}


@pytest.mark.parametrize("fmt", list(PREF_CASES))
def test_preference_formats_train_the_reward_model(work, fmt):
    rows = PREF_CASES[fmt] + [{**PREF_CASES[fmt][0], "rejected": PREF_CASES[fmt][0]["chosen"]}]  # dropped: identical
    path = write_jsonl(work / "pref.jsonl", rows)
    data_dir, dm = data_stage(f"pref-{fmt}", [f"data.preference.path={path}"], work / "corpus")
    assert (dm["pref_rows_read"], dm["pref_rows_kept"], dm["pref_rows_dropped_identical_responses"]) == (11, 10, 1)
    first = json.loads(open(f"{data_dir}/pref_train.jsonl").readline())
    assert first["prompt"][-1]["role"] == "user" and first["chosen"] != first["rejected"]
    if fmt == "implicit":
        assert [m["content"] for m in first["prompt"][:2]] == ["Hi", "Hello"]
    m = run_stage("reward", compose("reward", [*REWARD, f"data_dir={data_dir}"]), f"outputs/reward-{fmt}", "test")
    assert m["train_rows_kept"] == dm["n_pref_train"] and 0 <= m["val_accuracy"] <= 1


def corpus_files(work, fmt):
    """The same documents in the given corpus format; returns the data.corpus entry and extra overrides."""
    if fmt == "folder":
        return work / "corpus", []
    if fmt == "jsonl":
        write_jsonl(work / "c.jsonl", [{"id": i, "body": d} for i, d in enumerate(DOCS)] + [{"id": 99, "body": " "}])
        return work / "c.jsonl", ["data.text_column=body"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pq.write_table(pa.table({"text": DOCS}), work / "c.parquet")
        return work / "c.parquet", []
    import datasets

    if fmt == "hf_disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(work / "hf"))
        return work / "hf", ["data.corpus_format=hf"]
    write_jsonl(work / "c.jsonl", [{"text": d} for d in DOCS])  # hf_files: load_dataset("json", data_files=...)
    return work / "c.jsonl", ["data.corpus_format=hf"]


@pytest.mark.parametrize("fmt", ["folder", "jsonl", "parquet", "hf_disk", "hf_files"])
def test_corpus_formats_pretrain_through_config(work, fmt):
    entry, extra = corpus_files(work, fmt)
    data_dir, dm = data_stage(f"corpus-{fmt}", extra, entry)
    assert dm["corpus_docs"] == len(DOCS)
    assert dm.get("corpus_docs_dropped_empty", 0) == (1 if fmt == "jsonl" else 0)
    meta = json.loads(open(f"{data_dir}/meta.json").read())
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(d.encode()) for d in DOCS)
    tok = load_tokenizer(data_dir)
    tokens = np.concatenate([np.fromfile(f"{data_dir}/{s}.bin", "<u2") for s in ("train", "val")])
    assert int((tokens == tok.eos_id).sum()) == len(DOCS)
    m = run_stage("pretrain", compose("pretrain", [*PRETRAIN, f"data_dir={data_dir}"]), f"outputs/pre-{fmt}", "test")
    assert m["steps"] == 2 and np.isfinite(m["val_loss"])


def test_one_long_text_file_is_split_into_documents_by_max_doc_mb(work):
    book = work / "book.txt"  # one file (a plain-text book as downloaded): one document, no validation split
    book.write_text("".join(d + "\n" for d in DOCS))
    n = len(book.read_bytes())
    assert_exit("data", [*DATA, f"data.corpus=[{book}]"], "outputs/data-book", r"got 1 \(.*book\.txt.*"
                r"data\.max_doc_mb=0\.05")
    data_dir, dm = data_stage("book", ["data.max_doc_mb=0.001"], book)  # documents of 1,000 to 1,125 bytes
    assert -(-n // 1125) <= dm["corpus_docs"] <= -(-n // 1000)
    meta = json.loads(open(f"{data_dir}/meta.json").read())
    assert meta["train_bytes"] + meta["val_bytes"] == n and meta["val_docs"][0] == f"{book}#0"
    assert meta["n_train_docs"] >= 1 and meta["train_docs"][0].startswith(f"{book}#")
    tokens = np.concatenate([np.fromfile(f"{data_dir}/{s}.bin", "<u2") for s in ("train", "val")])
    assert int((tokens == load_tokenizer(data_dir).eos_id).sum()) == dm["corpus_docs"]
    m = run_stage("pretrain", compose("pretrain", [*PRETRAIN, f"data_dir={data_dir}"]), "outputs/pre-book", "test")
    assert m["steps"] == 2 and np.isfinite(m["val_loss"])


def test_brought_tokenizer_survives_every_stage(work):
    """A GPT-2-style tokenizer (one special token, PAD = EOS): its ids and template are unchanged in every output."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(DOCS * 3, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (work / "gpt2").mkdir()
    raw.save(str(work / "gpt2" / "tokenizer.json"))
    (work / "gpt2" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}')
    sft = write_jsonl(work / "sft.jsonl", [{"prompt": f"Say {i}.", "completion": str(i)} for i in range(10)])
    data_dir, dm = data_stage("byo-tok", [f"data.tokenizer.path={work / 'gpt2'}", f"data.sft.path={sft}"],
                              work / "corpus")
    eot = raw.token_to_id("<|endoftext|>")
    assert dm["vocab_size"] == raw.get_vocab_size() + 3  # the three chat-role tokens, appended
    assert json.loads(open(f"{data_dir}/meta.json").read())["eos_id"] == eot
    run_stage("pretrain", compose("pretrain", [*PRETRAIN, f"data_dir={data_dir}"]), "outputs/pre-byo", "test")
    run_stage("sft", compose("sft", [*SFT, f"data_dir={data_dir}", "init_from=outputs/pre-byo"]), "outputs/sft-byo",
              "test")
    configs = {d: open(f"{d}/tokenizer_config.json").read() for d in (data_dir, "outputs/pre-byo", "outputs/sft-byo")}
    assert len(set(configs.values())) == 1
    files = {d: open(f"{d}/tokenizer.json").read() for d in configs}
    assert len(set(files.values())) == 1
    tok = load_tokenizer("outputs/sft-byo")
    assert tok.eos_id == tok.pad_id == tok.bos_id == eot
    assert tok.encode("the quick brown fox") == raw.encode("the quick brown fox").ids


def assert_exit(stage, overrides, out, match):
    with pytest.raises(SystemExit) as e:
        run_stage(stage, compose(stage, overrides), out, "test")
    assert e.value.code not in (0, None)
    assert __import__("re").search(match, str(e.value.code)), e.value.code


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', r"bad\.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "response": "b"}\n[1, 2]\n', r"bad\.jsonl:2: row must be an object"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n',
     r"bad\.jsonl:2: missing field 'response'.*found \['answer', 'prompt'\]"),
    ("", r"bad\.jsonl: empty file"),
    ('{"prompt": "a", "response": " "}\n{"prompt": "b", "response": ""}\n',
     r"bad\.jsonl: all 2 rows were dropped \(empty_response: 2\)"),
])
def test_bad_sft_file_exits_and_writes_nothing(work, content, match):
    (work / "bad.jsonl").write_text(content)
    assert_exit("data", [*DATA, f"data.corpus=[{work / 'corpus'}]", f"data.sft.path={work / 'bad.jsonl'}"],
                "outputs/data-bad", match)
    import os
    assert not os.path.exists("outputs/data-bad")


def test_non_utf8_corpus_exits(work):
    (work / "corpus" / "zz.txt").write_bytes(b"fine line\nbad \xff byte\n")
    assert_exit("data", [*DATA, f"data.corpus=[{work / 'corpus'}]"], "outputs/data-bad", r"zz\.txt.*line 2|zz\.txt:2")


def test_empty_documents_are_counted_in_the_error(work, tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    (tmp_path / "blank" / "b.txt").write_text("")
    assert_exit("data", [*DATA, f"data.corpus=[{tmp_path / 'blank'}]"], "outputs/data-bad",
                r"the corpus has no text: every document in it is empty or whitespace only; documents dropped: "
                r"empty: 2")
    from llmstages.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.data\.corpus: is empty .*corpus_format=hf"):
        run_stage("data", compose("data", [*DATA, "data.corpus_format=hf"]), "outputs/data-bad", "test")


def test_every_row_too_long_exits_before_training(work):
    rows = [{"prompt": "word " * 80 + str(i), "response": "x"} for i in range(6)]
    data_dir, _ = data_stage("long", [f"data.sft.path={write_jsonl(work / 'long.jsonl', rows)}"], work / "corpus")
    assert_exit("sft", [*SFT, f"data_dir={data_dir}", "long_prompt=drop"], "outputs/sft-long",
                r"sft_train\.jsonl \(max_len=64, long_prompt=drop\): all \d+ rows were dropped \(too_long: \d+\)")
    import os
    assert not os.path.exists("outputs/sft-long")
    m = run_stage("sft", compose("sft", [*SFT, f"data_dir={data_dir}"]), "outputs/sft-long", "test")
    assert m["train_rows_truncated"] == m["train_rows_kept"] > 0 and np.isfinite(m["val_loss"])
