"""``llmstages chat``: a multi-turn conversation with a model in the terminal.

Each turn encodes the whole conversation with the chat template (:meth:`~llmstages.tokenizer.ChatTokenizer.
encode_prompt`: BOS, then each message as its role token + text, the assistant's closed by EOS, then the
assistant role token) and samples the reply with :func:`~llmstages.generation.generate`, printing its text as
the tokens come. When the conversation no longer fits the model's context (``max_seq_len`` minus the reply's
``max_new_tokens``), its oldest turns are dropped (a system message stays) and a line says so.

Commands typed at the prompt: ``/reset`` (forget the conversation), ``/help``, ``/exit`` (or end of input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .generation import generate
from .model import GPT
from .tokenizer import ChatTokenizer

HELP = "commands: /reset forgets the conversation, /help shows this, /exit (or Ctrl-D) ends"


@dataclass
class Sampling:
    """How each reply is sampled: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 0


def fit_context(messages: list[dict], tok: ChatTokenizer, budget: int) -> tuple[list[dict], int]:
    """The latest turns of ``messages`` whose prompt takes at most ``budget`` tokens, the system message (if
    first) kept; returns them and how many messages were dropped. The last message always stays (a user
    message longer than the budget is then the caller's to refuse)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    start = 0
    while start < len(rest) - 1 and len(tok.encode_prompt(system + rest[start:])) > budget:
        start += 1
        while start < len(rest) - 1 and rest[start]["role"] != "user":  # whole turns: start at a user message
            start += 1
    return system + rest[start:], start


def reply(model: GPT, tok: ChatTokenizer, messages: list[dict], sampling: Sampling, generator: torch.Generator,
          write: Callable[[str], None]) -> str:
    """Sample the assistant's answer to ``messages``, passing its text to ``write`` piece by piece as the tokens
    come (a piece is written once it decodes to whole characters); returns the whole answer."""
    ids: list[int] = []
    shown = [""]

    def on_token(step_ids: torch.Tensor) -> None:
        t = int(step_ids[0])
        if t in (tok.eos_id, tok.pad_id):
            return
        ids.append(t)
        text = tok.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown[0]):  # not inside a multi-byte character
            write(text[len(shown[0]):])
            shown[0] = text

    generate(model, [tok.encode_prompt(messages)], sampling.max_new_tokens, tok.eos_id, tok.pad_id,
             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator,
             on_token=on_token)
    text = tok.decode(ids)
    if text != shown[0]:
        write(text[len(shown[0]):] if text.startswith(shown[0]) else "\n" + text)
    return text


def chat(model: GPT, tok: ChatTokenizer, sampling: Sampling, lines: Iterator[str],
         write: Callable[[str], None], system: str | None = None, echo: bool = False) -> int:
    """Run the conversation: each of ``lines`` is a user message or a command (module docstring); ``write``
    receives everything shown (the ``you>`` prompts included; with ``echo``, each line read too, as piped
    input is not shown by a terminal). Returns the number of replies given."""
    model.eval()
    generator = torch.Generator().manual_seed(sampling.seed)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    budget = model.cfg.max_seq_len - sampling.max_new_tokens
    replies = 0
    write(f"{HELP}\n")
    while True:
        write("you> ")
        line = next(lines, None)
        if echo and line is not None:
            write(f"{line}\n")
        if line is None or line.strip() in ("/exit", "/quit"):
            write("\n")
            return replies
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if line.startswith("/"):
            write(f"{HELP}\n" if line == "/help" else f"unknown command {line}; {HELP}\n")
            continue
        messages, dropped = fit_context(messages + [{"role": "user", "content": line}], tok, budget)
        if len(tok.encode_prompt(messages)) > budget:
            write(f"(that message is too long for the model's {model.cfg.max_seq_len}-token context with "
                  f"{sampling.max_new_tokens} tokens left for the reply; say less or lower --max-new-tokens)\n")
            messages.pop()
            continue
        if dropped:
            write(f"(the {dropped} oldest message(s) no longer fit the context and were dropped)\n")
        write("assistant> ")
        answer = reply(model, tok, messages, sampling, generator, write)
        write("\n")
        messages.append({"role": "assistant", "content": answer})
        replies += 1


def read_lines(stream) -> Iterator[str]:
    """The lines of ``stream`` without their newline, until end of input; from a terminal through ``input()``
    (line editing and history where ``readline`` exists)."""
    if not stream.isatty():
        for line in stream:
            yield line.rstrip("\n")
        return
    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass
    while True:
        try:
            yield input()
        except EOFError:
            return
