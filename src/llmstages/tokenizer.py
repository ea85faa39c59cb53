"""Byte-level BPE tokenizer and the chat template shared by every stage.

Token ids 0..5 are reserved for :data:`SPECIAL_TOKENS` (pad, bos, eos and the
three chat roles).  Text is split into single digits (so ``"123"`` is always three
tokens, which keeps arithmetic learnable) and then byte-level BPE is applied, so
every string round-trips exactly through ``encode``/``decode``.

Chat layout (see :data:`CHAT_TEMPLATE`)::

    <|bos|><|user|>{prompt}<|assistant|>{response}<|eos|>
    mask:  0      0     0...0       0        1...1      1
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID = 0, 1, 2, 3, 4, 5

#: Jinja-style description of the chat template (documentation / interop only;
#: :func:`encode_prompt` and :func:`encode_chat` are the implementation).
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|eos|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _check_specials(tok: Tokenizer, source: str) -> None:
    """Raise ValueError unless ``SPECIAL_TOKENS[i]`` has id ``i`` in ``tok``."""
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise ValueError(f"{source}: special token {t!r} has id {got}, expected {i}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: training documents (any iterable of str).
        vocab_size: target vocabulary size including the 6 specials and the 256
            byte symbols; must be >= 262. The result may be smaller if the corpus
            has too few distinct merges.

    Returns:
        A ``tokenizers.Tokenizer``; same texts -> byte-identical ``to_str()``.

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
    _check_specials(tok, "trained tokenizer")
    return plain_text_mode(tok)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tok`` as a ``tokenizer.json`` file at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str(), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by :func:`save_tokenizer`.

    Raises:
        FileNotFoundError: if ``path`` does not exist (message names the path).
        ValueError: if the file is not a tokenizer or the special-token ids are not 0..5.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
    _check_specials(tok, str(path))
    return plain_text_mode(tok)


def plain_text_mode(tok: Tokenizer) -> Tokenizer:
    """Make special-token strings inside text encode as ordinary text (in place; returns ``tok``).

    ``tokenizers`` does not serialize this flag, so :func:`train_tokenizer`,
    :func:`load_tokenizer` and the encode helpers re-apply it. Thus ``"<|eos|>"``
    typed in a prompt never becomes ``EOS_ID``.
    """
    if not tok.encode_special_tokens:
        tok.encode_special_tokens = True
    return tok


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return plain_text_mode(tok).encode(text, add_special_tokens=False).ids


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """Ids for a generation prompt: ``[BOS, USER] + encode(prompt) + [ASSISTANT]``."""
    return [BOS_ID, USER_ID, *_encode(tok, prompt), ASSISTANT_ID]


def encode_chat(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Ids and loss mask for one prompt/response exchange.

    Returns:
        ``(ids, loss_mask)`` of equal length ``encode_prompt(prompt) + encode(response) + [EOS]``;
        the mask is 0 on the prompt part and 1 on the response tokens and the final EOS.
    """
    p = encode_prompt(tok, prompt)
    r = [*_encode(tok, response), EOS_ID]
    return p + r, [0] * len(p) + [1] * len(r)


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Decode ``ids`` up to (not including) the first EOS, skipping special tokens."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tok.decode(ids, skip_special_tokens=True)
