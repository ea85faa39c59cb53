"""Tests for llmstages.tokenizer on a real (tiny) trained byte-level BPE tokenizer."""

import pytest
from tokenizers import Tokenizer, models, trainers

from llmstages.tokenizer import (
    ASSISTANT_ID, BOS_ID, CHAT_TEMPLATE, EOS_ID, PAD_ID, SPECIAL_TOKENS, SYSTEM_ID, USER_ID,
    decode, encode_chat, encode_prompt, load_tokenizer, save_tokenizer, train_tokenizer,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "What's 12 + 30? The answer is 42.",
    "Unicode: café, naïve, 東京, emoji 🙂.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_special_ids(tok):
    assert (PAD_ID, BOS_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID) == (0, 1, 2, 3, 4, 5)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tok.get_vocab_size() == 300
    assert "<|assistant|>" in CHAT_TEMPLATE and "<|eos|>" in CHAT_TEMPLATE


def test_digits_split_individually(tok):
    assert tok.encode("123", add_special_tokens=False).tokens == ["1", "2", "3"]
    # "1234567890" occurs 20 times in training, still never merged
    assert tok.encode("x 1234567890", add_special_tokens=False).tokens[-10:] == list("1234567890")


def test_encode_adds_no_specials_and_specials_in_text_are_plain(tok):
    assert ids(tok, "hello") == tok.encode("hello").ids
    assert all(i > ASSISTANT_ID for i in encode_prompt(tok, "say <|eos|> now")[2:-1])


def test_encode_prompt_and_chat_hand_checked(tok):
    d = {c: tok.token_to_id(c) for c in "7+42"}
    assert encode_prompt(tok, "7+4") == [BOS_ID, USER_ID, d["7"], d["+"], d["4"], ASSISTANT_ID]
    chat_ids, mask = encode_chat(tok, "7+4", "42")
    assert chat_ids == [1, 4, d["7"], d["+"], d["4"], 5, d["4"], d["2"], 2]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_encode_chat_lengths(tok):
    p, r = "What's 12 + 30?", "The answer is 42."
    chat_ids, mask = encode_chat(tok, p, r)
    n_p, n_r = len(encode_prompt(tok, p)), len(ids(tok, r))
    assert len(chat_ids) == len(mask) == n_p + n_r + 1
    assert mask == [0] * n_p + [1] * (n_r + 1)
    assert chat_ids[-1] == EOS_ID


def test_decode_roundtrip_and_stops_at_eos(tok):
    for text in set(TEXTS):
        assert decode(tok, ids(tok, text)) == text
    assert decode(tok, ids(tok, "hello") + [EOS_ID] + ids(tok, "world")) == "hello"
    assert decode(tok, encode_prompt(tok, "hi")) == "hi"
    chat_ids, _ = encode_chat(tok, "q", "café 42")
    assert decode(tok, chat_ids[chat_ids.index(ASSISTANT_ID) + 1 :]) == "café 42"
    assert decode(tok, [EOS_ID, *ids(tok, "x")]) == ""


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    tok2 = load_tokenizer(path)
    assert tok2.to_str() == tok.to_str()
    for text in set(TEXTS):
        assert ids(tok2, text) == ids(tok, text)
    assert encode_chat(tok2, "a", "b") == encode_chat(tok, "a", "b")
    assert all(i > ASSISTANT_ID for i in ids(tok2, "<|eos|>"))  # plain-text mode re-applied on load


def test_training_is_deterministic(tmp_path):
    a, b = train_tokenizer(TEXTS, 300), train_tokenizer(iter(TEXTS), 300)
    save_tokenizer(a, tmp_path / "a.json")
    save_tokenizer(b, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(missing)
    # a tokenizer whose specials are in another order
    other = Tokenizer(models.BPE())
    other.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=SPECIAL_TOKENS[::-1]))
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"other\.json.*<\|pad\|>"):
        load_tokenizer(tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="junk.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="262"):
        train_tokenizer(TEXTS, 100)
