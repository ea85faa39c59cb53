"""`llmstages chat`: two turns driven through stdin and through a pseudo-terminal give the replies that the
chat template and greedy decoding give for the whole conversation; `/reset` forgets it; an over-long history
drops its oldest turns."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT
from llmstages.chat import fit_context
from llmstages.export import load_model
from llmstages.generation import generate

LLMSTAGES = str(Path(sys.executable).parent / "llmstages")
ENV = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}


def greedy(model, tok, messages: list[dict], n: int = 12) -> str:
    g = generate(model, [tok.encode_prompt(messages)], n, tok.eos_id, tok.pad_id, temperature=0.0)
    return tok.decode([t for t in g.responses[0].tolist() if t not in (tok.eos_id, tok.pad_id)])


def expected_replies(sft: Path) -> tuple[str, str, str]:
    """Greedy replies to turn 1, to turn 2 after turn 1, and to turn 2 alone (after /reset)."""
    model, _, tok = load_model(sft)
    model.eval()
    u1, u2 = {"role": "user", "content": "What's 2 + 2?"}, {"role": "user", "content": "What's 3 + 5?"}
    a1 = greedy(model, tok, [u1])
    return a1, greedy(model, tok, [u1, {"role": "assistant", "content": a1}, u2]), greedy(model, tok, [u2])


def test_chat_two_turns_through_stdin_keep_the_conversation(tiny_run):
    work, _ = tiny_run
    sft = work / "outputs/sft"
    a1, a2, a2_alone = expected_replies(sft)
    p = subprocess.run([LLMSTAGES, "chat", str(sft), "--temperature", "0", "--max-new-tokens", "12"],
                       input="What's 2 + 2?\nWhat's 3 + 5?\n/reset\nWhat's 3 + 5?\n", capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    answers = [part.split("\nyou> ")[0] for part in p.stdout.split("assistant> ")[1:]]
    assert answers == [a1, a2, a2_alone]
    assert "(conversation reset)" in p.stdout


def test_chat_refuses_a_reward_model_and_bad_sampling_values(tiny_run):
    work, _ = tiny_run
    for args, message in [([str(work / "outputs/reward")], "is a reward model"),
                          ([str(work / "outputs/sft"), "--temperature", "nan"], "nan is not a finite number"),
                          # a system message that leaves no room: refused at the start, not at every later message
                          ([str(work / "outputs/sft"), "--system", "word " * 300], "the --system message is ")]:
        p = subprocess.run([LLMSTAGES, "chat", *args], input="hi\n", capture_output=True, text=True, env=ENV,
                           timeout=300)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_chat_in_a_pseudo_terminal(tiny_run):
    """The same two turns typed at a terminal (input() with line editing); Ctrl-D ends the session."""
    work, _ = tiny_run
    sft = work / "outputs/sft"
    a1, a2, _ = expected_replies(sft)
    fd, terminal = pty.openpty()
    proc = subprocess.Popen([LLMSTAGES, "chat", str(sft), "--temperature", "0", "--max-new-tokens", "12"],
                            stdin=terminal, stdout=terminal, stderr=terminal, env=ENV, start_new_session=True)
    os.close(terminal)
    out = b""

    def type_line(text: bytes) -> None:  # as a person types: after the prompt is up (readline, on starting to
        time.sleep(0.5)                   # read, discards what was typed ahead)
        os.write(fd, text)

    def read_until(marker: bytes, count: int) -> None:
        nonlocal out
        deadline = time.time() + 120
        while out.count(marker) < count and time.time() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return

    read_until(b"you> ", 1)
    type_line(b"What's 2 + 2?\n")
    read_until(b"you> ", 2)
    type_line(b"What's 3 + 5?\n")
    read_until(b"you> ", 3)
    type_line(b"\x04")  # Ctrl-D
    assert proc.wait(timeout=120) == 0
    read_until(b"\x00", 1)  # the rest of the output
    os.close(fd)
    text = out.decode().replace("\r\n", "\n")
    answers = [part.split("\nyou> ")[0] for part in text.split("assistant> ")[1:]]
    assert answers == [a1, a2]


def test_fit_context_drops_whole_oldest_turns_and_keeps_the_system_message(tiny_run):
    work, _ = tiny_run
    _, _, tok = load_model(work / "outputs/sft")
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"What's {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
    msgs.append({"role": "user", "content": "What's 9 + 9?"})
    full = len(tok.encode_prompt(msgs))
    kept, dropped = fit_context(msgs, tok, full)
    assert (kept, dropped) == (msgs, 0)
    kept, dropped = fit_context(msgs, tok, full - 1)
    assert dropped == 2 and kept == msgs[:1] + msgs[3:]  # one whole turn (question and answer) went
    kept, dropped = fit_context(msgs, tok, 1)
    assert kept == [msgs[0], msgs[-1]] and dropped == 12  # the last message always stays
