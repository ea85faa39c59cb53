"""Save and load a stage output: ``model.safetensors`` + ``config.json`` + ``meta.json`` + the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, see :class:`llmstages.tokenizer.ChatTokenizer`).

A stage output folder is what one stage hands the next (``outputs/<stage>/``). Weights are stored with
``safetensors``; a reward model or a policy with a value head stores its head under ``head.*``.
"""

from __future__ import annotations

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
    save_file(tensors, str(out / WEIGHTS))
    write_json(out / CONFIG, model.cfg.to_dict())
    tokenizer.save(out)
    write_json(out / META, meta)
    return out


def load_output(path: str | Path, with_head: bool = False) -> tuple[GPT, ScalarHead | None, dict]:
    """Load a stage output folder: ``(model, head or None, meta)``, on the CPU, in float32.

    Raises:
        FileNotFoundError: naming the folder and the missing file (e.g. the upstream stage has not run).
        ValueError: if ``with_head`` and the folder holds no scalar head.
    """
    path = Path(path)
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: is {path} a stage output (run its stage first)?")
    cfg = GPTConfig(**json.loads((path / CONFIG).read_text()))
    model = GPT(cfg)
    tensors = load_file(str(path / WEIGHTS))
    head_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    body_sd = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    if cfg.tie_embeddings:
        body_sd["lm_head.weight"] = body_sd["embed.weight"]
    model.load_state_dict(body_sd)
    head = None
    if with_head:
        if not head_sd:
            raise ValueError(f"{path / WEIGHTS} has no scalar head (expected a reward-model output)")
        head = ScalarHead(cfg.d_model, bias="linear.bias" in head_sd)  # reward heads have none
        head.load_state_dict(head_sd)
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return model, head, meta
