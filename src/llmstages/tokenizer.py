"""The tokenizer layer shared by every stage: a ``tokenizers`` tokenizer, its special tokens and the chat template.

A :class:`ChatTokenizer` is either trained here (byte-level BPE, :func:`train_tokenizer`) or brought by the user
as a local Hugging Face tokenizer (a ``tokenizer.json`` file or a folder holding one, :func:`load_tokenizer`).
It is saved as the two files Hugging Face uses, so ``transformers.AutoTokenizer.from_pretrained(folder)``
reads it too:

    tokenizer.json          the tokenizer, with the chat-role tokens added as special tokens
    tokenizer_config.json   ``bos_token``, ``eos_token``, ``pad_token``, the role tokens and ``chat_template``

Every stage output carries both files, so special-token ids and the chat template never change after the data
stage.

Chat layout (the Jinja form is :func:`chat_template`; :meth:`ChatTokenizer.encode_chat` is the implementation)::

    <bos><|system|>{system}<|user|>{prompt}<|assistant|>{response}<eos><|user|>...
    loss mask: 1 on every assistant response token and the EOS that ends it, 0 elsewhere

The model is trained from scratch by the pipeline, so this template is the one it learns; a brought
tokenizer's own ``chat_template`` is replaced (a warning says so). A brought *model* (a Hugging Face checkpoint
folder that starts a stage) keeps its own template when it has one (``keep_template``): then the conversation is
rendered by that Jinja template as ``transformers``' ``apply_chat_template`` renders it, and the loss mask covers
each assistant turn as the template writes it (up to and including the first EOS in it), found by rendering the
conversation up to that turn with and without it (:meth:`ChatTokenizer.encode_chat`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger("llmstages")

TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
#: Specials of a tokenizer trained here, in id order 0..5.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", *ROLE_TOKENS.values()]
#: EOS names tried, in order, for a brought tokenizer with no ``tokenizer_config.json``.
KNOWN_EOS = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def chat_template(bos: str, eos: str, roles: dict[str, str] = ROLE_TOKENS) -> str:
    """The Jinja chat template (Hugging Face ``apply_chat_template`` form) equivalent to ``encode_chat``."""
    parts = [f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{r}' %}}{{{{ '{roles[r]}' + message['content']"
             + (f" + '{eos}'" if r == "assistant" else "") + " }}" for i, r in enumerate(ROLES)]
    return (f"{{{{ '{bos}' }}}}{{% for message in messages %}}{''.join(parts)}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ '{roles['assistant']}' }}}}{{% endif %}}")


@dataclass
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids of its special tokens.

    Text is always encoded with special-token strings treated as plain text (a prompt that contains
    ``"<|eos|>"`` never yields the EOS id) and without any post-processor tokens.
    """

    tok: Tokenizer
    bos: str
    eos: str
    pad: str
    template: str | None = None  # a brought model's own Jinja chat template; None: llmstages' role-token layout

    def __post_init__(self) -> None:
        self.tok.encode_special_tokens = True  # not serialised by tokenizers: set on every construction
        roles = () if self.template else ROLE_TOKENS.items()  # an own template spells the roles its own way
        ids = {name: self.tok.token_to_id(t) for name, t in (("bos", self.bos), ("eos", self.eos), ("pad", self.pad),
                                                              *roles)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer has no token for {missing} (bos={self.bos!r}, eos={self.eos!r}, "
                             f"pad={self.pad!r}, roles={list(ROLE_TOKENS.values())})")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.role_ids = {r: ids[r] for r in ROLES if r in ids}
        if self.template:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def refuse(message: str):
                raise ValueError(f"the chat template refused the conversation: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
            env.globals["raise_exception"] = refuse
            try:
                self._jinja = env.from_string(self.template)
            except TemplateError as err:
                raise ValueError(f"its chat_template is not valid Jinja: {err}") from None
            self._with_specials = Tokenizer.from_str(self.tok.to_str())  # the rendered text's special tokens count

    @property
    def vocab_size(self) -> int:
        """Size of the id space (largest id + 1), the model's minimum vocabulary."""
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def chat_template(self) -> str:
        return self.template or chat_template(self.bos, self.eos)

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        try:
            return self._jinja.render(messages=list(messages), add_generation_prompt=generation_prompt,
                                      bos_token=self.bos, eos_token=self.eos, pad_token=self.pad)
        except ValueError:  # raise_exception() of the template: it refused the conversation, and says why
            raise
        except Exception as err:  # noqa: BLE001  (a template is code: an undefined name, a bad call...)
            raise ValueError(f"the chat template failed on a conversation of roles "
                             f"{[m['role'] for m in messages]}: {type(err).__name__}: {err}") from None

    def _encode_rendered(self, text: str) -> list[int]:
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text`` (no special tokens added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to (not including) the first EOS, special tokens skipped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Ids and loss mask (equal lengths) of a conversation ``[{"role", "content"}, ...]``.

        The mask is 1 on each assistant message's tokens and the EOS that closes it, 0 on BOS, role tokens,
        system and user text.

        With an own ``template``: the rendered text, cut before and after each assistant turn (the render of the
        messages before it with the generation prompt, then with it), each part tokenized with special tokens
        recognised; the mask is 1 on the assistant turn's tokens up to and including its first EOS.

        Raises:
            ValueError: a role other than system/user/assistant; with an own template, a template that refuses
                the conversation or whose render of a conversation does not start with the render of its first
                messages (it cannot mark assistant turns).
        """
        if self.template:
            return self._encode_with_template(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            if m["role"] not in self.role_ids:
                raise ValueError(f"unknown chat role {m['role']!r} (expected one of {list(ROLES)})")
            body = self.encode(m["content"])
            ids.append(self.role_ids[m["role"]])
            mask.append(0)
            if m["role"] == "assistant":
                ids += [*body, self.eos_id]
                mask += [1] * (len(body) + 1)
            else:
                ids += body
                mask += [0] * len(body)
        return ids, mask

    def _encode_with_template(self, messages: Sequence[dict],
                              generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Ids and mask by the own template, tokenized in parts cut before and after each assistant turn (so
        that :meth:`encode_prompt` of the first messages is a prefix of the whole conversation's ids)."""
        cuts: list[tuple[str, bool]] = []  # (render ending a part, whether that part is an assistant turn)
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise ValueError(f"unknown chat role {m['role']!r} (expected one of {list(ROLES)})")
            if m["role"] == "assistant":
                cuts += [(self._render(messages[:i], True), False), (self._render(messages[:i + 1], False), True)]
        cuts.append((self._render(messages, generation_prompt), False))
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # the text tokenized so far
        for text, is_turn in cuts:
            if not text.startswith(done):
                raise ValueError("the chat template renders a conversation so that it does not start with the "
                                 "render of its first messages, so its assistant turns cannot be told apart for the "
                                 "loss mask; train with llmstages' template instead (a folder without chat_template)")
            part = self._encode_rendered(text[len(done):])
            turn = (part.index(self.eos_id) + 1 if self.eos_id in part else len(part)) if is_turn else 0
            ids += part
            mask += [1] * turn + [0] * (len(part) - turn)
            done = text
        return ids, mask

    def encode_prompt(self, prompt: str | Sequence[dict]) -> list[int]:
        """Generation prompt ids: the conversation (a string is one user message) then the assistant token (with
        an own template: its render with ``add_generation_prompt``)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.template:
            return self._encode_with_template(messages, generation_prompt=True)[0]
        return self.encode_chat(messages)[0] + [self.role_ids["assistant"]]

    def encode_response(self, prompt: str | Sequence[dict], response: str) -> list[int]:
        """Ids of ``response`` as the assistant's reply after :meth:`encode_prompt` ``(prompt)``: its tokens and
        EOS (with an own template: the turn as the template writes it, up to and including its first EOS)."""
        if not self.template:
            return self.encode(response) + [self.eos_id]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, mask = self._encode_with_template([*messages, {"role": "assistant", "content": response}])
        end = len(mask) - mask[::-1].index(1)  # the last assistant turn: the last run of mask 1 (it is not empty)
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        return ids[start:end]

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (created); returns ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(self.tok.to_str(), encoding="utf-8")
        roles = [] if self.template else list(ROLE_TOKENS.values())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos, "eos_token": self.eos,
                  "pad_token": self.pad, "additional_special_tokens": roles,
                  "chat_template": self.chat_template, "clean_up_tokenization_spaces": False}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> ChatTokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; specials get ids 0..5 (:data:`SPECIAL_TOKENS`).

    Digits are split individually (``"123"`` is always three tokens, which keeps arithmetic learnable) and
    every string round-trips exactly through ``encode``/``decode``.

    Args:
        texts: training documents (any iterable of str).
        vocab_size: target vocabulary size including the 6 specials and the 256 byte symbols (>= 262); the
            result may be smaller if the corpus has too few distinct merges.

    Raises:
        ValueError: if ``vocab_size`` is too small.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} must be >= {len(SPECIAL_TOKENS) + len(alphabet)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok, bos="<|bos|>", eos="<|eos|>", pad="<|pad|>")


def _token_name(value) -> str | None:
    """A special token in ``tokenizer_config.json``: a string or ``{"content": ...}`` (AddedToken form)."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None,
                   pad_token: str | None = None, keep_template: bool = False) -> ChatTokenizer:
    """Load a tokenizer saved by :meth:`ChatTokenizer.save`, or bring a Hugging Face one.

    ``path`` is a ``tokenizer.json`` file or a folder holding one (and usually ``tokenizer_config.json``).
    Special tokens come from the arguments, else ``tokenizer_config.json``, else (EOS only) the first of
    :data:`KNOWN_EOS` in the vocabulary. A missing BOS becomes ``<|bos|>`` (added); a missing PAD is the EOS
    (padding is always masked by length, never by id, so PAD == EOS is safe). Missing chat-role tokens are
    added as special tokens at the end of the vocabulary; existing ids never change.

    With ``keep_template`` (a model's tokenizer: a stage output's, or a brought checkpoint's) a ``chat_template``
    in ``tokenizer_config.json`` other than llmstages' own is kept (:class:`ChatTokenizer` ``template``) and no
    role tokens are added; without it (a tokenizer for a model trained from scratch) it is replaced, with a
    warning.

    Raises:
        FileNotFoundError: no tokenizer at ``path`` (message names the path).
        ValueError: not a valid ``tokenizer.json`` / ``tokenizer_config.json``, no EOS could be determined, or
            a named special token is not in the vocabulary.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        hint = " (a folder must hold tokenizer.json; convert slow tokenizers with transformers first)" \
            if path.is_dir() else ""
        raise FileNotFoundError(f"tokenizer not found: {file}{hint}")
    try:
        tok = Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from e
    config_file = file.parent / CONFIG_FILE
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}:{e.lineno}: invalid JSON ({e.msg})") from e
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = eos_token or _token_name(config.get("eos_token")) or next((t for t in KNOWN_EOS if t in vocab), None)
    if eos is None:
        raise ValueError(f"{file}: cannot tell the EOS token (no {CONFIG_FILE} and none of {list(KNOWN_EOS)} in the "
                         f"vocabulary); set data.tokenizer.eos_token")
    bos = bos_token or _token_name(config.get("bos_token")) or "<|bos|>"
    pad = pad_token or _token_name(config.get("pad_token")) or eos
    for name, t in (("eos_token", eos), ("pad_token", pad)):
        if t not in vocab:
            raise ValueError(f"{file}: {name} {t!r} is not in the vocabulary")
    template = config.get("chat_template")
    if not template and (file.parent / TEMPLATE_FILE).is_file():  # where transformers >= 4.43 saves it
        template = (file.parent / TEMPLATE_FILE).read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates [{"name", "template"}]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    own = template if template and template != chat_template(bos, eos) else None
    new = [t for t in (bos, *(() if own and keep_template else ROLE_TOKENS.values())) if t not in vocab]
    if new:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        log.info("%s: added special tokens %s", file, new)
    if own and not keep_template:
        log.warning("%s: its chat_template is replaced by llmstages' role-token template (the model is trained "
                    "from scratch with it)", config_file)
    try:
        return ChatTokenizer(tok, bos=bos, eos=eos, pad=pad, template=own if keep_template else None)
    except ValueError as err:
        raise ValueError(f"{config_file if own and keep_template else file}: {err}") from None
