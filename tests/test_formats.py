"""llmstages.data.formats: every SFT / preference format into the canonical rows, drops, and the exact errors."""

from __future__ import annotations

import json
import re

import pytest

from llmstages.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    LoadReport,
    common_prefix_prompt,
    load_preferences,
    load_sft,
)


def jsonl(tmp_path, rows, name="data.jsonl"):
    """Write rows (dicts, or raw strings written as-is) one per line; return the path as a string."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def test_format_tuples():
    assert SFT_FORMATS == ("auto", "prompt_completion", "prompt_response", "alpaca", "messages", "sharegpt",
                           "instances")
    assert PREFERENCE_FORMATS == ("auto", "explicit", "implicit", "hh")


# ----------------------------------------------------------------------------------------------------------- SFT


def test_prompt_completion_strings_auto_with_task(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "2+2=", "completion": "4", "task": "arith"},
                            {"prompt": "Hi", "completion": "Hey"}])
    rows, report = load_sft(path)
    assert rows == [{"messages": [u("2+2="), a("4")], "task": "arith"},
                    {"messages": [u("Hi"), a("Hey")], "task": "user"}]
    assert report == LoadReport(path=path, format="prompt_completion", read=2, kept=2, dropped={})


def test_prompt_completion_trl_conversational_lists(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [s("Be brief."), u("Hi"), a("Hey"), u("Sum 1+1")],
                             "completion": [a("2")]}])
    rows, report = load_sft(path, fmt="prompt_completion")
    assert rows == [{"messages": [s("Be brief."), u("Hi"), a("Hey"), u("Sum 1+1"), a("2")], "task": "user"}]
    assert report.format == "prompt_completion"


def test_prompt_response_renamed_columns_and_system_prompt(tmp_path):
    path = jsonl(tmp_path, [{"question": "Q1", "answer": "A1", "kind": "qa"}])
    rows, report = load_sft(path, columns={"prompt": "question", "response": "answer", "task": "kind"},
                            system_prompt="You are helpful.")
    assert rows == [{"messages": [s("You are helpful."), u("Q1"), a("A1")], "task": "qa"}]
    assert report.format == "prompt_response"


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Name a color.", "output": "Blue"},
    ], indent=2), encoding="utf-8")
    rows, report = load_sft(path)
    assert rows == [
        {"messages": [u("Add the numbers.\n\n2 and 3"), a("5")], "task": "user"},
        {"messages": [u("Say hi."), a("Hi!")], "task": "user"},
        {"messages": [u("Name a color."), a("Blue")], "task": "user"},
    ]
    assert report == LoadReport(path=str(path), format="alpaca", read=3, kept=3, dropped={})


def test_alpaca_renamed_instruction(tmp_path):
    path = jsonl(tmp_path, [{"query": "Why?", "input": "ctx", "output": "Because."}])
    rows, _ = load_sft(path, columns={"instruction": "query"})
    assert rows == [{"messages": [u("Why?\n\nctx"), a("Because.")], "task": "user"}]


def test_messages_multiturn_trim_and_system_prompt(tmp_path):
    path = jsonl(tmp_path, [
        {"messages": [s("Sys."), u("a"), a("b"), u("c"), a("d"), u("trailing")]},
        {"messages": [u("x"), a("y")]},
    ])
    rows, report = load_sft(path, system_prompt="Default.")
    assert rows == [
        {"messages": [s("Sys."), u("a"), a("b"), u("c"), a("d")], "task": "user"},  # own system kept, tail trimmed
        {"messages": [s("Default."), u("x"), a("y")], "task": "user"},
    ]
    assert report == LoadReport(path=path, format="messages", read=2, kept=2, dropped={})


def test_sharegpt_auto(tmp_path):
    path = jsonl(tmp_path, [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
        {"from": "user", "value": "h2"}, {"from": "chatgpt", "value": "g2"}, {"from": "human", "value": "h3"},
        {"from": "model", "value": "g3"}]}])
    rows, report = load_sft(path)
    assert rows == [{"messages": [s("S"), u("h1"), a("g1"), u("h2"), a("g2"), u("h3"), a("g3")], "task": "user"}]
    assert report.format == "sharegpt"


def test_conversations_with_role_content_is_messages_style(tmp_path):
    path = jsonl(tmp_path, [{"conversations": [u("q"), a("r")]}])
    rows, report = load_sft(path)
    assert rows == [{"messages": [u("q"), a("r")], "task": "user"}]
    assert report.format == "messages"


def test_messages_with_renamed_keys(tmp_path):
    path = jsonl(tmp_path, [{"dialog": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "r"}]}])
    rows, report = load_sft(path, columns={"messages": "dialog", "role": "speaker", "content": "text"})
    assert rows == [{"messages": [u("q"), a("r")], "task": "user"}]
    assert report.format == "messages"
    path = jsonl(tmp_path, [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}],
                 name="b.jsonl")
    rows, _ = load_sft(path, columns={"messages": "conversations", "role": "from", "content": "value"})
    assert rows == [{"messages": [u("q"), a("r")], "task": "user"}]


def test_sft_drops_counted(tmp_path):
    path = jsonl(tmp_path, [
        {"messages": [u("q"), a("ok")]},
        {"messages": [u("only a question")]},  # no_assistant_turn
        {"messages": [s("S"), u("q")]},  # no_assistant_turn
        {"messages": [u("q"), a("  \n"), u("q2"), a("r2")]},  # empty_response (an earlier assistant turn)
    ])
    rows, report = load_sft(path)
    assert rows == [{"messages": [u("q"), a("ok")], "task": "user"}]
    assert report == LoadReport(path=path, format="messages", read=4, kept=1,
                                dropped={"empty_response": 1, "no_assistant_turn": 2})
    assert list(report.dropped) == ["empty_response", "no_assistant_turn"]


def test_sft_all_dropped(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "},
                            {"prompt": "c", "completion": [u("not an answer")]}])
    with pytest.raises(ValueError) as e:
        load_sft(path)
    assert str(e.value) == f"{path}: all 3 rows were dropped (empty_response: 2, no_assistant_turn: 1)"


def test_sft_empty_file(tmp_path):
    path = jsonl(tmp_path, ["", "   "])
    with pytest.raises(ValueError) as e:
        load_sft(path, fmt="alpaca", columns={"instruction": "query"})
    assert str(e.value) == f"{path}: empty file, expected SFT rows with fields: alpaca (query, output)"
    with pytest.raises(ValueError) as e:
        load_sft(path)
    assert str(e.value).startswith(f"{path}: empty file, expected SFT rows with fields: prompt_completion (prompt, "
                                   "completion); prompt_response (prompt, response); alpaca (instruction, output); "
                                   "messages (messages); sharegpt (conversations)")


def test_invalid_json_line(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, "{not json"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")) as e:
        load_sft(path)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    # a row cut short (its closing brace lost): the column where it ends, not "line 2 column 1" past its newline
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, '{"prompt": "broken", "completion": "x"'])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON (Expecting ',' delimiter at column 39)")):
        load_sft(path)


def test_non_object_row(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, "[1, 2]"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: row must be an object, got list")):
        load_sft(path)


def test_missing_field_on_later_row(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(ValueError) as e:
        load_sft(path)
    assert str(e.value) == (f"{path}:2: missing field 'completion' (required ['prompt', 'completion'], "
                            "found ['answer', 'prompt'])")


def test_undetectable_sft_format(tmp_path):
    path = jsonl(tmp_path, [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError) as e:
        load_sft(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:1: cannot detect the SFT format from fields ['answer', 'question']; "
                          "expected one of:")
    for part in ("prompt_completion (prompt, completion)", "alpaca (instruction, output)", "sharegpt (conversations)"):
        assert part in msg


@pytest.mark.parametrize(("message", "error"), [
    ({"role": "user", "content": 3}, "messages[1]: 'content' must be a string, got int: 3"),
    ({"role": None, "content": "x"}, "messages[1]: 'role' must be a string, got NoneType: None"),
    ({"content": "x"}, "messages[1]: message has no 'role' (found ['content'])"),
    ("hello", "messages[1]: message must be an object, got str"),
    ({"role": "narrator", "content": "x"}, "messages[1]: unknown role 'narrator' (allowed: ['assistant', 'chatgpt', "
                                           "'gpt', 'human', 'model', 'system', 'user'])"),
    ({"role": "system", "content": "x"}, "system message at position 1 of the conversation; it may only come first"),
])
def test_bad_messages(tmp_path, message, error):
    path = jsonl(tmp_path, [{"messages": [u("q"), a("r")]}, {"messages": [u("q"), message, a("r")]}])
    with pytest.raises(ValueError) as e:
        load_sft(path)
    assert str(e.value) == f"{path}:2: {error}"


def test_bad_field_types(tmp_path):
    path = jsonl(tmp_path, [{"messages": "hi"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'messages' must be a list of messages, got str")):
        load_sft(path)
    path = jsonl(tmp_path, [{"prompt": 5, "completion": "b"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'prompt' must be a string or a list of messages")):
        load_sft(path)
    path = jsonl(tmp_path, [{"instruction": "i", "output": ["o"]}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'output' must be a string, got list")):
        load_sft(path)
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b", "task": 7}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'task' must be a string, got int")):
        load_sft(path)


def test_unknown_column_key_and_format(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError) as e:
        load_sft(path, fmt="alpaca", columns={"prompt": "question"})
    assert str(e.value) == (f"{path}: unknown column mapping key 'prompt' for format 'alpaca' "
                            "(valid keys: ['input', 'instruction', 'output', 'task'])")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown column mapping key 'bogus' for format 'auto'")):
        load_sft(path, columns={"bogus": "x"})
    with pytest.raises(ValueError) as e:  # valid for some format, not for the detected one
        load_sft(path, columns={"input": "context"})
    assert str(e.value).startswith(f"{path}: unknown column mapping key 'input' for format 'prompt_completion'")
    with pytest.raises(ValueError) as e:
        load_sft(path, fmt="chatml")
    assert str(e.value) == (f"{path}: unknown SFT format 'chatml' (choose from ['auto', 'prompt_completion', "
                            "'prompt_response', 'alpaca', 'messages', 'sharegpt', 'instances'])")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown preference format 'pairs'")):
        load_preferences(path, fmt="pairs")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sft(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------- preferences


def test_explicit_strings_task_and_system_prompt(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "task": "arith"},
                            {"prompt": [s("Own."), u("Hi")], "chosen": "Hello", "rejected": "Go away"}])
    rows, report = load_preferences(path, system_prompt="Default.")
    assert rows == [
        {"prompt": [s("Default."), u("2+2=")], "chosen": "4", "rejected": "5", "task": "arith"},
        {"prompt": [s("Own."), u("Hi")], "chosen": "Hello", "rejected": "Go away", "task": "user"},
    ]
    assert report == LoadReport(path=path, format="explicit", read=2, kept=2, dropped={})


def test_explicit_trl_conversational(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [u("Hi"), a("Hey"), u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}])
    rows, _ = load_preferences(path, fmt="explicit")
    assert rows == [{"prompt": [u("Hi"), a("Hey"), u("2+2?")], "chosen": "4", "rejected": "5", "task": "user"}]


def test_explicit_ultrafeedback_style(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "Q?", "chosen": [u("Q?"), a("good")], "rejected": [u("Q?"), a("bad")],
                             "score_chosen": 8.0}])
    rows, report = load_preferences(path)
    assert rows == [{"prompt": [u("Q?")], "chosen": "good", "rejected": "bad", "task": "user"}]
    assert report.format == "explicit"


def test_explicit_ultrafeedback_mismatch_and_bad_reply(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "Q?", "chosen": [u("Other?"), a("good")], "rejected": "bad"}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == f"{path}:1: 'chosen' repeats the conversation but its message 0 differs from the prompt"
    path = jsonl(tmp_path, [{"prompt": "Q?", "chosen": "good", "rejected": [u("Q?"), a("x"), a("y")]}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == (f"{path}:1: 'rejected' must be one assistant reply after the prompt, "
                            "got roles ['assistant', 'assistant']")
    path = jsonl(tmp_path, [{"prompt": [u("Q"), a("A")], "chosen": "good", "rejected": "bad"}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == f"{path}:1: 'prompt' must end with a user or system message, got roles ['user', 'assistant']"


def test_explicit_renamed_columns(tmp_path):
    path = jsonl(tmp_path, [{"question": "Q", "good": "yes", "bad": "no"}])
    rows, report = load_preferences(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert rows == [{"prompt": [u("Q")], "chosen": "yes", "rejected": "no", "task": "user"}]
    assert report.format == "explicit"


def test_implicit_shared_prefix(tmp_path):
    shared = [s("S"), u("a"), a("b"), u("c")]
    sharegpt = [{"from": "human", "value": "q"}]
    path = jsonl(tmp_path, [
        {"chosen": [*shared, a("good")], "rejected": [*shared, a("bad")]},
        {"chosen": [*sharegpt, {"from": "gpt", "value": "g"}], "rejected": [*sharegpt, {"from": "gpt", "value": "b"}]},
    ])
    rows, report = load_preferences(path)
    assert rows == [{"prompt": shared, "chosen": "good", "rejected": "bad", "task": "user"},
                    {"prompt": [u("q")], "chosen": "g", "rejected": "b", "task": "user"}]
    assert report == LoadReport(path=path, format="implicit", read=2, kept=2, dropped={})


def test_implicit_diverging_prefix(tmp_path):
    path = jsonl(tmp_path, [{"chosen": [u("a"), a("b"), u("c"), a("good")],
                             "rejected": [u("a"), a("DIFFERENT"), u("c"), a("bad")]}])
    with pytest.raises(ValueError) as e:
        load_preferences(path, fmt="implicit")
    assert str(e.value) == (f"{path}:1: 'chosen' and 'rejected' differ at message 1, before their final assistant "
                            "replies (their prompt must be the same)")
    path = jsonl(tmp_path, [{"chosen": [u("a"), a("good")], "rejected": [u("a"), a("b"), u("c"), a("bad")]}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: 'chosen' and 'rejected' differ at message 1,")):
        load_preferences(path)
    path = jsonl(tmp_path, [{"chosen": [u("a"), a("good")], "rejected": [u("a")]}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == f"{path}:1: 'rejected' must end with an assistant message, got roles ['user']"


def test_common_prefix_prompt():
    prompt, chosen, rejected = common_prefix_prompt([u("q"), a("x")], [u("q"), a("y")], "here")
    assert (prompt, chosen, rejected) == ([u("q")], "x", "y")
    with pytest.raises(ValueError) as e:
        common_prefix_prompt([a("x")], [a("y")], "here")
    assert str(e.value) == ("here: the prompt shared by 'chosen' and 'rejected' must end with a user or system "
                            "message, got roles []")


def test_hh(tmp_path):
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: No idea."
    path = jsonl(tmp_path, [{"chosen": chosen, "rejected": rejected}])
    rows, report = load_preferences(path, system_prompt="S")
    assert rows == [{"prompt": [s("S"), u("Hi there"), a("Hello!"), u("What is 2+2?")], "chosen": "It is 4.",
                     "rejected": "No idea.", "task": "user"}]
    assert report == LoadReport(path=path, format="hh", read=1, kept=1, dropped={})
    path = jsonl(tmp_path, [{"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: "}],
                 name="single.jsonl")  # no leading blank line; an empty reply is dropped
    with pytest.raises(ValueError, match=re.escape(f"{path}: all 1 rows were dropped (empty_response: 1)")):
        load_preferences(path)


def test_hh_without_markers(tmp_path):
    path = jsonl(tmp_path, [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
                            {"chosen": "just text", "rejected": "\n\nHuman: q\n\nAssistant: b"}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == (f"{path}:2: 'chosen' is not an HH-RLHF dialogue (expected '\\n\\nHuman: ...\\n\\n"
                            "Assistant: ...' turns), got 'just text'")


def test_undetectable_preference_format(tmp_path):
    path = jsonl(tmp_path, [{"chosen": "plain", "rejected": "text"}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:1: cannot detect the preference format from fields ['chosen', 'rejected']; "
                          "expected one of: explicit (prompt, chosen, rejected); implicit (chosen, rejected); "
                          "hh (chosen, rejected)")


def test_preference_drops_and_all_dropped(tmp_path):
    path = jsonl(tmp_path, [
        {"prompt": "q", "chosen": "A", "rejected": "B"},
        {"prompt": "q", "chosen": "same", "rejected": "same "},
        {"prompt": "q", "chosen": "", "rejected": "B"},
        {"prompt": "q", "chosen": "A", "rejected": [a("  ")]},
    ])
    rows, report = load_preferences(path)
    assert rows == [{"prompt": [u("q")], "chosen": "A", "rejected": "B", "task": "user"}]
    assert report == LoadReport(path=path, format="explicit", read=4, kept=1,
                                dropped={"empty_response": 2, "identical_responses": 1})
    path = jsonl(tmp_path, [{"prompt": "q", "chosen": "x", "rejected": "x"},
                            {"prompt": "q", "chosen": "", "rejected": ""}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == f"{path}: all 2 rows were dropped (empty_response: 1, identical_responses: 1)"


def test_preference_empty_file_and_missing_field(tmp_path):
    path = jsonl(tmp_path, [])
    with pytest.raises(ValueError) as e:
        load_preferences(path, fmt="explicit")
    assert str(e.value) == (f"{path}: empty file, expected preference rows with fields: "
                            "explicit (prompt, chosen, rejected)")
    path = jsonl(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert str(e.value) == (f"{path}:2: missing field 'rejected' (required ['prompt', 'chosen', 'rejected'], "
                            "found ['chosen', 'prompt'])")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown column mapping key 'completion' for format "
                                                   "'auto' (valid keys: ['chosen', 'content', 'prompt', 'rejected', "
                                                   "'role', 'task'])")):
        load_preferences(path, columns={"completion": "x"})


def test_compressed_files_are_read_as_they_ship(tmp_path):
    """HH-RLHF ships as train.jsonl.gz: gzip, bzip2 and xz files are read by their first bytes, whatever their
    name; a zstandard file gets an error that says to decompress it."""
    import bz2
    import gzip
    import lzma

    rows = [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
             "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: No idea."}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    want, _ = load_preferences(jsonl(tmp_path, rows))
    for name, opener in [("train.jsonl.gz", gzip.open), ("train.jsonl.bz2", bz2.open), ("train.jsonl.xz", lzma.open),
                         ("gzip-without-suffix.jsonl", gzip.open)]:
        with opener(tmp_path / name, "wt") as f:
            f.write(text)
        got, report = load_preferences(tmp_path / name)
        assert got == want and report.format == "hh" and report.kept == 1, name
    (tmp_path / "train.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
    with pytest.raises(ValueError, match=r"train.jsonl.zst: zstandard-compressed, .*decompress it first"):
        load_preferences(tmp_path / "train.jsonl.zst")


def test_on_bad_row_skip_drops_and_counts_malformed_rows(tmp_path):
    """A public file with a few broken rows (0.2% of HH-RLHF's test split): by default they stop the load, each
    named with its line (the first 20); with skip_bad they are dropped and counted as "malformed"."""
    good = {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5."}
    lines = [json.dumps(good), "{not json", json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}), "[1, 2]",
             json.dumps({**good, "chosen": "\n\nHuman: 3+3?\n\nAssistant: 6.",
                         "rejected": "\n\nHuman: 3+3?\n\nAssistant: 7."})]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_preferences(path, "hh")
    assert str(err.value) == (f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column "
                              f"2) [3 malformed rows of 5; also {path}:3: missing field 'rejected' (required "
                              f"['chosen', 'rejected'], found ['chosen']); {path}:4: row must be an object, got list]")
    path.with_name("many.jsonl").write_text("{not json\n" * 25 + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"many\.jsonl:1: invalid JSON .*\[25 malformed rows of 26; also .*"
                                         r"many\.jsonl:20: invalid JSON [^;]*, \.\.\.\]$"):
        load_preferences(path.with_name("many.jsonl"), "hh")
    rows, report = load_preferences(path, "hh", skip_bad=True)
    assert [r["chosen"] for r in rows] == ["4.", "6."]
    alpaca = tmp_path / "alpaca.jsonl"  # the wrong format forced: one short error, not one per row
    alpaca.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) + "\n"
                              for i in range(300)))
    with pytest.raises(ValueError) as err:
        load_sft(alpaca, "messages")
    assert str(err.value) == (f"{alpaca}: none of its 300 rows fits the 'messages' format (format auto detects the "
                              f"format from the first row); the first: {alpaca}:1: missing field 'messages' "
                              f"(required ['messages'], found ['instruction', 'output'])")
    assert (report.read, report.kept, report.dropped) == (5, 2, {"malformed": 3})


def test_instances_rows_give_one_example_per_instance(tmp_path):
    """Natural-Instructions / Self-Instruct rows: an instruction and a list of instances (input, output)."""
    path = jsonl(tmp_path, [{"instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"},
                                                                             {"input": "", "output": "0"}]},
                            {"instruction": "Say hi.", "instances": [{"output": "hi"}, {"input": "x", "output": " "}],
                             "task": "greet"}])
    rows, report = load_sft(path)
    assert report.format == "instances" and (report.read, report.kept) == (2, 3)
    assert rows == [{"messages": [u("Add the numbers.\n\n2 3"), a("5")], "task": "user"},
                    {"messages": [u("Add the numbers."), a("0")], "task": "user"},
                    {"messages": [u("Say hi."), a("hi")], "task": "greet"}]
    bad = jsonl(tmp_path, [{"instruction": "Add.", "instances": [{"input": "1"}]}], name="bad.jsonl")
    with pytest.raises(ValueError, match=re.escape("bad.jsonl:1: instances[0]: 'output' must be a string, it is "
                                                   "missing")):
        load_sft(bad)
    bad = jsonl(tmp_path, [{"instruction": "Add.", "instances": [{"input": "1", "output": None}]}], name="bad.jsonl")
    with pytest.raises(ValueError, match=re.escape("bad.jsonl:1: instances[0]: 'output' must be a string, got null")):
        load_sft(bad)
