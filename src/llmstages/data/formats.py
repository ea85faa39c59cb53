"""Read user SFT and preference datasets, in the formats the ecosystem uses, into one canonical form.

Files are JSONL or one JSON array of objects (see :mod:`llmstages.data.jsonio`). Canonical rows:

* SFT: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "task": str}``, ending with
  an assistant message, with a system message only in first position.
* Preference: ``{"prompt": [messages ending with a non-assistant message], "chosen": str, "rejected": str,
  "task": str}``; chosen/rejected are the texts of the final assistant replies.

``task`` is the row's optional string field "task" (default "user").

SFT formats (``load_sft``), one row each:

* ``messages``: ``{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}``
* ``sharegpt``: ``{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}``
* ``alpaca``: ``{"instruction": "Add.", "input": "2+2", "output": "4"}``: user = instruction, plus "\\n\\n" + input
  when input is present and non-empty.
* ``instances``: ``{"instruction": "Add.", "instances": [{"input": "2+2", "output": "4"}, ...]}`` (Natural
  Instructions / Self-Instruct style): one example per instance, each as ``alpaca`` with the shared instruction;
  ``LoadReport.kept`` counts examples.
* ``prompt_completion``: ``{"prompt": "2+2=", "completion": "4"}``
* ``prompt_response``: ``{"prompt": "2+2=", "response": "4"}``. In both, either side may be a message list
  instead of a string (TRL's conversational prompt-completion form).
* ``auto``: from the first row's fields, in this order: messages -> messages; conversations -> sharegpt (or
  messages when its first element has no "from"); instruction + instances -> instances; instruction + output -> alpaca; prompt + completion ->
  prompt_completion; prompt + response -> prompt_response.

Preference formats (``load_preferences``):

* ``explicit``: ``{"prompt": "2+2=", "chosen": "4", "rejected": "5"}``. prompt may be a message list;
  chosen/rejected may be a message list holding just the reply (``[{"role": "assistant", ...}]``, TRL) or the
  whole conversation repeating the prompt messages first (UltraFeedback-binarized), which are stripped.
* ``implicit``: ``{"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}``: the prompt
  is what both conversations share before their final assistant message (see ``common_prefix_prompt``).
* ``hh``: ``{"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4", "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"}``
  (Anthropic HH-RLHF), parsed into messages (contents stripped), then read as implicit.
* ``auto``: prompt present -> explicit; else chosen a list -> implicit; chosen a string with "\\n\\nHuman:" (or
  starting with "Human:") -> hh.

Messages are role/content or ShareGPT from/value objects; roles system, user, assistant, and the ShareGPT aliases
human (user), gpt/chatgpt/model (assistant). ``columns`` maps canonical field names, including "role", "content"
and "task", to the file's names, e.g. ``{"prompt": "question", "completion": "answer"}``; auto-detection uses the
mapped names. ``system_prompt`` (when not None) is prepended as a system message to every conversation (SFT) or
prompt (preference) that has none.

Rows dropped rather than rejected, counted by reason in ``LoadReport.dropped``:

* SFT: trailing non-assistant messages are trimmed first; then ``no_assistant_turn`` when no message is left (the
  conversation had no assistant message), ``empty_response`` when any assistant message is blank (whitespace).
* Preference: ``empty_response`` when chosen or rejected is blank, else ``identical_responses`` when they are equal
  ignoring surrounding whitespace.

Every error is a ``ValueError`` starting with ``path:line`` (``path[i]`` in a JSON array; the path alone for
file-level errors): invalid JSON or non-object rows, missing fields, an undetectable format, malformed messages
(message index and key), unknown roles, a system message not first, prompts that do not match, an empty file,
every row dropped, an unknown format or column-mapping key. A missing file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import logging

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmstages.data.jsonio import iter_rows, require_fields

log = logging.getLogger("llmstages")

SFT_FORMATS = ("auto", "prompt_completion", "prompt_response", "alpaca", "messages", "sharegpt", "instances")
PREFERENCE_FORMATS = ("auto", "explicit", "implicit", "hh")

# Required fields of each format (canonical names); ``columns`` may also map the optional keys below.
_SFT_FIELDS = {"prompt_completion": ("prompt", "completion"), "prompt_response": ("prompt", "response"),
               "alpaca": ("instruction", "output"), "messages": ("messages",), "sharegpt": ("conversations",),
               "instances": ("instruction", "instances")}
_PREF_FIELDS = {"explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
                "hh": ("chosen", "rejected")}
_OPTIONAL_KEYS = {"alpaca": ("input", "task"), "instances": ("input", "output", "task"), "hh": ("task",)}  # any other format: role, content, task
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "model": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


MAX_LISTED = 20  #: malformed rows named in the error of a load that does not skip them


@dataclass
class LoadReport:
    """What a load did: the file, the format used (auto resolved), rows read and kept, drops by reason."""

    path: str
    format: str
    read: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)


def load_sft(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
             system_prompt: str | None = None, skip_bad: bool = False) -> tuple[list[dict], LoadReport]:
    """Canonical SFT rows of ``path`` (format ``fmt``, one of ``SFT_FORMATS``) and a report; see the module doc.
    ``skip_bad``: a malformed row (invalid JSON, a missing or mistyped field) is dropped and counted as
    ``malformed`` (the first few logged with their ``file:line``); without it the whole file is read and then a
    ``ValueError`` names the first :data:`MAX_LISTED` malformed rows (``file:line: reason``) and their count."""
    return _load("SFT", path, fmt, columns, system_prompt, _SFT_FIELDS, _detect_sft, _sft_row, skip_bad)


def load_preferences(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                     system_prompt: str | None = None, skip_bad: bool = False) -> tuple[list[dict], LoadReport]:
    """Canonical preference rows of ``path`` (``fmt`` in ``PREFERENCE_FORMATS``) and a report; see the module doc
    and :func:`load_sft` for ``skip_bad``."""
    return _load("preference", path, fmt, columns, system_prompt, _PREF_FIELDS, _detect_pref, _pref_row, skip_bad)


def read_canonical(path: str | Path, kind: str) -> list[dict]:
    """Rows of a canonical file written by the data stage (``kind`` "sft" or "preference"), validated again.

    Raises:
        ValueError / FileNotFoundError: as :func:`load_sft` / :func:`load_preferences`.
    """
    rows, _ = load_sft(path, "messages") if kind == "sft" else load_preferences(path, "explicit")
    return rows


def common_prefix_prompt(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], str, str]:
    """Split two canonical conversations into their shared prompt and the two final assistant replies.

    Raises:
        ValueError: starting with ``where``: a conversation that does not end with an assistant message; the index
            of the first message at which the two differ before their final replies; an empty prompt, or one that
            ends with an assistant message.
    """
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"{where}: {name!r} must end with an assistant message, got roles {_roles(conv)}")
    prompt, other = chosen[:-1], rejected[:-1]
    if prompt != other:
        raise ValueError(f"{where}: 'chosen' and 'rejected' differ at message {_first_difference(prompt, other)}, "
                         "before their final assistant replies (their prompt must be the same)")
    _check_prompt(where, "the prompt shared by 'chosen' and 'rejected'", prompt)
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _load(kind, path, fmt, columns, system_prompt, table, detect, convert, skip_bad=False):
    """Shared driver: check ``fmt`` and ``columns``, detect from the first row, then convert or drop each row."""
    if fmt not in ("auto", *table):
        raise ValueError(f"{path}: unknown {kind} format {fmt!r} (choose from {['auto', *table]})")
    cols = dict(columns or {})
    _check_columns(path, fmt, cols, table)
    forced = fmt != "auto"
    rows, dropped, read, errors = [], Counter(), 0, []
    for where, row in iter_rows(path, skip_bad=True):  # past a broken line: to count (skip) or list (error) all
        try:
            if isinstance(row, ValueError):  # a line that is not a JSON object (skip_bad only)
                raise row
            if fmt == "auto":  # detected from the first well-formed row
                fmt, cols = detect(where, row, cols)
                _check_columns(path, fmt, cols, table)
            read += 1
            require_fields(where, row, [cols.get(f, f) for f in table[fmt]])
            task_key = cols.get("task", "task")
            task = row.get(task_key, "user")
            if not isinstance(task, str):
                raise ValueError(f"{where}: {task_key!r} must be a string, got {type(task).__name__}")
            out = convert(fmt, where, row, cols, system_prompt)
        except ValueError as err:
            read += isinstance(row, ValueError)
            dropped["malformed"] += 1
            if skip_bad and dropped["malformed"] <= 3:
                log.warning("skipped (on_bad_row=skip): %s", err)
            elif not skip_bad and len(errors) < MAX_LISTED:
                errors.append(err)
            continue
        if isinstance(out, str):  # a drop reason
            dropped[out] += 1
        else:  # one row, or (instances) several
            rows.extend({**o, "task": task} for o in (out if isinstance(out, list) else [out]))
    if errors:  # on_bad_row=error: every malformed row stops the load; the first MAX_LISTED are named
        n = dropped["malformed"]
        if n == 1:
            raise errors[0]
        if n == read:  # not one row fits: the wrong format (or column mapping), not a few bad rows
            hint = ("format auto detects the format from the first row" if forced
                    else "check the columns mapping")
            raise ValueError(f"{path}: none of its {read} rows fits the {fmt!r} format ({hint}); the first: "
                             f"{errors[0]}") from (errors[0].__cause__ or errors[0])
        more = "; ".join(str(e) for e in errors[1:]) + (", ..." if n > len(errors) else "")
        raise ValueError(f"{errors[0]} [{n} malformed rows of {read}; also {more}]") from (errors[0].__cause__
                                                                                          or errors[0])
    if read == 0:
        raise ValueError(f"{path}: empty file, expected {kind} rows with fields: {_describe(fmt, cols, table)}")
    if not rows:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        raise ValueError(f"{path}: all {read} rows were dropped ({counts})")
    return rows, LoadReport(str(path), fmt, read, len(rows), dict(sorted(dropped.items())))


def _check_columns(path, fmt, cols, table):
    formats = list(table) if fmt == "auto" else [fmt]
    allowed = sorted({k for f in formats for k in (*table[f], *_OPTIONAL_KEYS.get(f, ("role", "content", "task")))})
    for key in cols:
        if key not in allowed:
            raise ValueError(f"{path}: unknown column mapping key {key!r} for format {fmt!r} (valid keys: {allowed})")


def _describe(fmt, cols, table):
    formats = list(table) if fmt == "auto" else [fmt]
    return "; ".join(f"{f} ({', '.join(cols.get(k, k) for k in table[f])})" for f in formats)


def _detect_sft(where, row, cols):
    if cols.get("messages", "messages") in row:
        return "messages", cols
    if cols.get("conversations", "conversations") in row:
        conv = row[cols.get("conversations", "conversations")]
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" in conv[0]:
            return "sharegpt", cols
        cols = dict(cols)  # role/content messages under "conversations": the messages format, renamed
        cols["messages"] = cols.pop("conversations", "conversations")
        return "messages", cols
    for fmt in ("instances", "alpaca", "prompt_completion", "prompt_response"):
        if all(cols.get(f, f) in row for f in _SFT_FIELDS[fmt]):
            return fmt, cols
    raise ValueError(f"{where}: cannot detect the SFT format from fields {sorted(row)}; expected one of: "
                     f"{_describe('auto', cols, _SFT_FIELDS)} (or pass the format, or columns to map field names)")


def _detect_pref(where, row, cols):
    chosen = row.get(cols.get("chosen", "chosen"))
    if cols.get("prompt", "prompt") in row:
        return "explicit", cols
    if isinstance(chosen, list):
        return "implicit", cols
    if isinstance(chosen, str) and ("\n\nHuman:" in chosen or chosen.startswith("Human:")):
        return "hh", cols
    raise ValueError(f"{where}: cannot detect the preference format from fields {sorted(row)}; expected one of: "
                     f"{_describe('auto', cols, _PREF_FIELDS)} (implicit: chosen is a message list; hh: chosen is "
                     "a '\\n\\nHuman: ...\\n\\nAssistant: ...' string)")


def _sft_row(fmt, where, row, cols, system_prompt):
    if fmt == "instances":  # one example per instance
        key = cols.get("instances", "instances")
        items = row[key]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where}: {key!r} must be a non-empty list of {{input, output}} objects, got "
                             f"{type(items).__name__ if not isinstance(items, list) else 'an empty list'}")
        out = []
        for i, inst in enumerate(items):
            if not isinstance(inst, dict):
                raise ValueError(f"{where}: {key}[{i}] must be an object, got {type(inst).__name__}")
            got = _sft_row("alpaca", f"{where}: {key}[{i}]", {**inst, "instruction": row[cols.get(
                "instruction", "instruction")]}, {k: v for k, v in cols.items() if k in ("input", "output")},
                system_prompt)
            if isinstance(got, dict):
                out.append(got)
        return out or "empty_response"
    if fmt == "alpaca":
        instruction, output = (_string(where, row, cols.get(k, k)) for k in ("instruction", "output"))
        extra = _string(where, row, cols.get("input", "input"), optional=True)
        msgs = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                {"role": "assistant", "content": output}]
    elif fmt in ("messages", "sharegpt"):
        key = cols.get(_SFT_FIELDS[fmt][0], _SFT_FIELDS[fmt][0])
        msgs = _messages(where, key, row[key], cols)
    else:
        prompt_key, reply_key = (cols.get(f, f) for f in _SFT_FIELDS[fmt])
        msgs = (_turns(where, prompt_key, row[prompt_key], "user", cols)
                + _turns(where, reply_key, row[reply_key], "assistant", cols))
    msgs = _with_system(where, msgs, system_prompt)
    while msgs and msgs[-1]["role"] != "assistant":  # trim trailing non-assistant turns
        msgs.pop()
    if not msgs:
        return "no_assistant_turn"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return "empty_response"
    return {"messages": msgs}


def _pref_row(fmt, where, row, cols, system_prompt):
    keys = (cols.get("chosen", "chosen"), cols.get("rejected", "rejected"))
    if fmt == "explicit":
        prompt_key = cols.get("prompt", "prompt")
        prompt = _turns(where, prompt_key, row[prompt_key], "user", cols)
        _check_prompt(where, repr(prompt_key), prompt)
        chosen, rejected = (_reply(where, k, row[k], prompt, cols) for k in keys)
    else:
        read = _hh if fmt == "hh" else _messages
        prompt, chosen, rejected = common_prefix_prompt(*(read(where, k, row[k], cols) for k in keys), where)
    prompt = _with_system(where, prompt, system_prompt)
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen.strip() == rejected.strip():
        return "identical_responses"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _string(where, row, key, optional=False):
    value = row.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        got = "it is missing" if key not in row else "got null" if value is None else f"got {type(value).__name__}"
        raise ValueError(f"{where}: {key!r} must be a string, {got}")
    return value


def _turns(where, key, value, role, cols):
    """A string (one ``role`` message) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} must be a string or a list of messages, got {type(value).__name__}")
    return _messages(where, key, value, cols)


def _messages(where, key, value, cols):
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{at}: message must be an object, got {type(msg).__name__}")
        role_key = cols.get("role") or ("from" if "role" not in msg and "from" in msg else "role")
        content_key = cols.get("content") or ("value" if role_key == "from" else "content")
        for k in (role_key, content_key):
            if k not in msg:
                raise ValueError(f"{at}: message has no {k!r} (found {sorted(msg)})")
            if not isinstance(msg[k], str):
                raise ValueError(f"{at}: {k!r} must be a string, got {type(msg[k]).__name__}: {msg[k]!r:.60}")
        if msg[role_key] not in _ROLES:
            raise ValueError(f"{at}: unknown role {msg[role_key]!r} (allowed: {sorted(_ROLES)})")
        out.append({"role": _ROLES[msg[role_key]], "content": msg[content_key]})
    return out


def _hh(where, key, text, cols=None):
    """Messages of an HH-RLHF dialogue string ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: {key!r} must be an HH-RLHF dialogue string, got {type(text).__name__}")
    parts = _HH_TURN.split("\n\n" + text if text.startswith(("Human:", "Assistant:")) else text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"{where}: {key!r} is not an HH-RLHF dialogue (expected '\\n\\nHuman: ...\\n\\nAssistant: "
                         f"...' turns), got {text[:60]!r}")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _reply(where, key, value, prompt, cols):
    """The final assistant text of chosen/rejected: a string, ``[assistant]``, or ``prompt + [assistant]``."""
    msgs = _turns(where, key, value, "assistant", cols)
    if len(msgs) > 1:  # the whole conversation (UltraFeedback-binarized): strip the repeated prompt
        i = _first_difference(prompt, msgs)
        if i < len(prompt):
            raise ValueError(f"{where}: {key!r} repeats the conversation but its message {i} differs from the prompt")
        msgs = msgs[len(prompt):]
    if _roles(msgs) != ["assistant"]:
        raise ValueError(f"{where}: {key!r} must be one assistant reply after the prompt, got roles {_roles(msgs)}")
    return msgs[0]["content"]


def _with_system(where, msgs, system_prompt):
    """Reject a system message after the first position; prepend ``system_prompt`` when there is none."""
    for i, m in enumerate(msgs[1:], 1):
        if m["role"] == "system":
            raise ValueError(f"{where}: system message at position {i} of the conversation; it may only come first")
    if system_prompt is not None and not (msgs and msgs[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *msgs]
    return msgs


def _check_prompt(where, name, prompt):
    if not prompt or prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: {name} must end with a user or system message, got roles {_roles(prompt)}")


def _roles(msgs):
    return [m["role"] for m in msgs]


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
