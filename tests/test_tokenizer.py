"""Tests for llmstages.tokenizer: a trained byte-level BPE, and a brought Hugging Face tokenizer."""

import json

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmstages.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS, ChatTokenizer, load_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "What's 12 + 30? The answer is 42.",
    "Unicode: café, naïve, 東京, emoji 🙂.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
] * 20
PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = range(6)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def gpt2_like(folder, config: dict | None = None):
    """A Hugging Face-style tokenizer folder whose only special token is <|endoftext|> (as GPT-2's)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return t


def test_special_ids(tok):
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    assert tok.role_ids == {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    assert tok.vocab_size == 300
    assert "<|assistant|>" in tok.chat_template and "<|eos|>" in tok.chat_template


def test_digits_split_individually(tok):
    assert tok.tok.encode("123", add_special_tokens=False).tokens == ["1", "2", "3"]
    # "1234567890" occurs 20 times in training, still never merged
    assert tok.tok.encode("x 1234567890", add_special_tokens=False).tokens[-10:] == list("1234567890")


def test_specials_in_text_are_plain(tok):
    assert all(i > ASSISTANT for i in tok.encode_prompt("say <|eos|> now <|user|>")[2:-1])


def test_encode_prompt_and_chat_hand_checked(tok):
    d = {c: tok.tok.token_to_id(c) for c in "7+42"}
    assert tok.encode_prompt("7+4") == [BOS, USER, d["7"], d["+"], d["4"], ASSISTANT]
    ids, mask = tok.encode_chat([{"role": "user", "content": "7+4"}, {"role": "assistant", "content": "42"}])
    assert ids == [1, 4, d["7"], d["+"], d["4"], 5, d["4"], d["2"], 2]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_multi_turn_mask_covers_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "7"}, {"role": "user", "content": "4"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "+"},
            {"role": "assistant", "content": "42"}]
    d = {c: tok.tok.token_to_id(c) for c in "7+42"}
    ids, mask = tok.encode_chat(msgs)
    assert ids == [BOS, SYSTEM, d["7"], USER, d["4"], ASSISTANT, d["2"], EOS, USER, d["+"], ASSISTANT, d["4"], d["2"],
                   EOS]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert tok.encode_prompt(msgs[:2]) == ids[:6]
    with pytest.raises(ValueError, match="'tool'"):
        tok.encode_chat([{"role": "tool", "content": "x"}])


def test_jinja_chat_template_renders_the_same_ids(tok):
    """The saved chat_template, rendered as transformers would, tokenizes to exactly encode_chat's ids."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 12 + 30?"},
            {"role": "assistant", "content": "42"}, {"role": "user", "content": "café?"}]
    template = jinja2.Environment().from_string(tok.chat_template)
    hf = Tokenizer.from_str(tok.tok.to_str())  # as transformers loads it: special-token strings are parsed
    text = template.render(messages=msgs, add_generation_prompt=True)
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode_prompt(msgs)
    text = template.render(messages=msgs[:3], add_generation_prompt=False)
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode_chat(msgs[:3])[0]


def test_decode_roundtrip_and_stops_at_eos(tok):
    for text in set(TEXTS):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("hello") + [EOS] + tok.encode("world")) == "hello"
    assert tok.decode(tok.encode_prompt("hi")) == "hi"
    assert tok.decode([EOS, *tok.encode("x")]) == ""


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert config["chat_template"] == tok.chat_template
    for path in (tmp_path / "out", tmp_path / "out" / "tokenizer.json"):
        tok2 = load_tokenizer(path)
        assert tok2.tok.to_str() == tok.tok.to_str()
        assert (tok2.pad_id, tok2.bos_id, tok2.eos_id, tok2.role_ids) == (tok.pad_id, tok.bos_id, tok.eos_id,
                                                                           tok.role_ids)
        for text in set(TEXTS):
            assert tok2.encode(text) == tok.encode(text)
        assert all(i > ASSISTANT for i in tok2.encode("<|eos|>"))  # plain-text mode re-applied on load


def test_brought_tokenizer_gets_role_tokens_and_pad_is_eos(tmp_path):
    raw = gpt2_like(tmp_path / "gpt2", {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"},
                                        "chat_template": "{{ messages }}"})
    tok = load_tokenizer(tmp_path / "gpt2")
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.eos_id == tok.pad_id == tok.bos_id == eot
    base = raw.get_vocab_size()
    assert sorted(tok.role_ids.values()) == [base, base + 1, base + 2]  # appended, existing ids unchanged
    assert tok.vocab_size == base + 3
    assert tok.encode("hello world") == raw.encode("hello world").ids
    ids, mask = tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert ids[0] == eot and ids[-1] == eot and mask[-1] == 1 and ids.count(eot) == 2
    # saved with every stage output: same ids and template after save/load, twice
    tok.save(tmp_path / "stage1")
    again = load_tokenizer(tmp_path / "stage1")
    again.save(tmp_path / "stage2")
    final = load_tokenizer(tmp_path / "stage2")
    for t in (again, final):
        assert (t.bos_id, t.eos_id, t.pad_id, t.role_ids, t.vocab_size) == (eot, eot, eot, tok.role_ids, base + 3)
        hi = [{"role": "user", "content": "hi"}]
        assert t.encode_chat(hi) == tok.encode_chat(hi)
    assert (tmp_path / "stage1" / "tokenizer.json").read_text() == (tmp_path / "stage2" / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "stage2" / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


def test_brought_tokenizer_without_config(tmp_path):
    raw = gpt2_like(tmp_path / "t")
    tok = load_tokenizer(tmp_path / "t" / "tokenizer.json")  # <|endoftext|> recognised as EOS; <|bos|> added
    assert tok.eos_id == tok.pad_id == raw.token_to_id("<|endoftext|>")
    assert tok.bos_id == raw.get_vocab_size() and tok.tok.id_to_token(tok.bos_id) == "<|bos|>"
    named = load_tokenizer(tmp_path / "t", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert named.bos_id == named.pad_id == named.eos_id


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="junk.json"):
        load_tokenizer(tmp_path / "junk.json")
    t = Tokenizer(models.BPE())
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    (tmp_path / "noeos").mkdir()
    t.save(str(tmp_path / "noeos" / "tokenizer.json"))
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(tmp_path / "noeos")
    with pytest.raises(ValueError, match=r"pad_token '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "noeos", eos_token="<unk>", pad_token="<nope>")
    (tmp_path / "noeos" / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json:1"):
        load_tokenizer(tmp_path / "noeos")


def test_training_is_deterministic(tmp_path):
    a, b = train_tokenizer(TEXTS, 300), train_tokenizer(iter(TEXTS), 300)
    assert a.tok.to_str() == b.tok.to_str()


def test_vocab_too_small():
    with pytest.raises(ValueError, match="262"):
        train_tokenizer(TEXTS, 100)


def test_role_tokens_constant():
    assert list(ROLE_TOKENS.values()) == SPECIAL_TOKENS[3:]
    assert isinstance(train_tokenizer(TEXTS, 300), ChatTokenizer)


def test_a_kept_chat_template_that_fails_names_what_and_where(tmp_path):
    """A brought model's own template is code: invalid Jinja names its file; a template that raises, or refuses
    a conversation through raise_exception(), gives a ValueError saying so."""
    def folder(name: str, template: str):
        gpt2_like(tmp_path / name, {"eos_token": "<|endoftext|>", "chat_template": template})
        return tmp_path / name

    with pytest.raises(ValueError, match=r"bad/tokenizer_config.json: its chat_template is not valid Jinja"):
        load_tokenizer(folder("bad", "{% if %}"), keep_template=True)
    calls = load_tokenizer(folder("calls", "{{ messages[0].content.upper(1) }}"), keep_template=True)
    with pytest.raises(ValueError, match=r"failed on a conversation of roles \['user'\]: TypeError"):
        calls.encode_prompt("hi")
    strict = load_tokenizer(folder("strict", "{% if messages[0]['role'] != 'system' %}"
                                             "{{ raise_exception('a system message first') }}{% endif %}"),
                            keep_template=True)
    with pytest.raises(ValueError, match=r"refused the conversation: a system message first"):
        strict.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert load_tokenizer(tmp_path / "bad").template is None  # without keep_template it is replaced, not read
