"""Save and load a stage output: ``model.safetensors`` + ``config.json`` + ``meta.json`` + the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, see :class:`llmstages.tokenizer.ChatTokenizer`).

A stage output folder is what one stage hands the next (``outputs/<stage>/``). Weights are stored with
``safetensors``; a reward model or a policy with a value head stores its head under ``head.*``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .model import GPT, GPTConfig, ScalarHead
from .tokenizer import ChatTokenizer

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.json", "tokenizer.json", "meta.json"


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def readable_by_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (``0o666`` less the umask): safetensors' ``save_file``
    (also under transformers' ``save_pretrained``) creates its files ``0o600``, private to their writer."""
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(0o666 & ~umask)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file readable as any other output (:func:`readable_by_umask`)."""
    save_file(tensors, str(path), metadata=metadata)
    readable_by_umask(path)


def read_json(file: str | Path) -> dict:
    """A JSON object from ``file``.

    Raises:
        FileNotFoundError: ``file`` is missing.
        ValueError: not JSON (naming the file, line and column) or not an object.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not a UTF-8 text file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(obj).__name__}")
    return obj


def save_output(out_dir: str | Path, model: GPT, tokenizer: ChatTokenizer, meta: dict,
                head: ScalarHead | None = None) -> Path:
    """Write a stage output to ``out_dir`` (created if missing; existing files of the same names replaced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # shared with embed.weight
    if head is not None:
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    save_safetensors(tensors, out / WEIGHTS)
    write_json(out / CONFIG, model.cfg.to_dict())
    tokenizer.save(out)
    write_json(out / META, meta)
    return out


def load_output(path: str | Path, with_head: bool = False) -> tuple[GPT, ScalarHead | None, dict]:
    """Load a stage output folder: ``(model, head or None, meta)``, on the CPU, in float32.

    Raises:
        FileNotFoundError: naming the folder and the missing file (e.g. the upstream stage has not run).
        ValueError: naming the file: a broken ``config.json``, unreadable weights, weights that do not fit the
            config; or ``with_head`` and the folder holds no scalar head.
    """
    path = Path(path)
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: is {path} a stage output (run its stage first)?")
    fields = read_json(path / CONFIG)
    missing = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in fields]
    if missing:  # save_output writes every field: a default here would build another architecture
        raise ValueError(f"{path / CONFIG}: missing key(s) {', '.join(missing)}")
    try:
        cfg = GPTConfig(**fields)
    except (TypeError, ValueError) as err:  # unknown or missing keys, values of the wrong type
        raise ValueError(f"{path / CONFIG}: not a llmstages model config ({err})") from None
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors' own error type: a truncated or corrupt file
        raise ValueError(f"{path / WEIGHTS}: cannot be read ({err})") from None
    head_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    body_sd = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    if cfg.tie_embeddings and "embed.weight" in body_sd:
        body_sd["lm_head.weight"] = body_sd["embed.weight"]
    try:
        model = GPT.from_weights(cfg, body_sd)
    except RuntimeError as err:  # missing tensors, or shapes that do not fit config.json
        raise ValueError(f"{path / WEIGHTS} does not fit {path / CONFIG}: "
                         f"{' '.join(str(err).split())[:300]}") from None
    head = None
    if with_head:
        if not head_sd:
            raise ValueError(f"{path / WEIGHTS} has no scalar head (expected a reward-model output)")
        head = ScalarHead(cfg.d_model, bias="linear.bias" in head_sd)  # reward heads have none
        head.load_state_dict(head_sd)
    meta = read_json(path / META) if (path / META).is_file() else {}
    return model, head, meta
