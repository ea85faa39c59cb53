"""Hugging Face interchange: export a stage output as a ``transformers`` Llama checkpoint, and start a stage from one.

Our causal LM is Llama's architecture (pre-norm RMSNorm blocks, rotary embeddings in the half-split layout,
SwiGLU MLP, no biases, optionally tied embeddings), so the weights map one to one; only the fused projections
are split (``qkv`` -> ``q_proj``/``k_proj``/``v_proj``, ``gate_up`` -> ``gate_proj``/``up_proj``):

    ours                              transformers (LlamaForCausalLM)
    embed.weight                      model.embed_tokens.weight
    blocks.{i}.attn_norm.weight       model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.qkv.weight        model.layers.{i}.self_attn.{q,k,v}_proj.weight   (rows split in 3)
    blocks.{i}.attn.proj.weight       model.layers.{i}.self_attn.o_proj.weight
    blocks.{i}.mlp_norm.weight        model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.gate_up.weight     model.layers.{i}.mlp.{gate,up}_proj.weight       (rows split in 2)
    blocks.{i}.mlp.down.weight        model.layers.{i}.mlp.down_proj.weight
    norm.weight                       model.norm.weight
    lm_head.weight                    lm_head.weight (absent when tied)
    head.linear.weight (reward)       score.weight (LlamaForSequenceClassification, num_labels=1)

A reward model exports as ``LlamaForSequenceClassification``, which reads the score at each row's last non-PAD
token, as :func:`~llmstages.evaluation.reward_scores` does; neither score head has a bias (see
:class:`~llmstages.model.ScalarHead`).

A causal LM trained with LoRA (``<output>/adapter``, in our layer names) also gets ``<folder>/adapter``: the same
adapter in the Llama names, for ``peft.PeftModel.from_pretrained(<the export of the stage's starting model>,
"<folder>/adapter")``. A fused layer's adapter splits exactly: its ``A`` is shared and its ``B`` rows split as the
weight's, so ``q_proj`` gets ``A`` and the first third of ``B`` (scale ``alpha / r`` unchanged).

The tokenizer is written as llmstages keeps it (``tokenizer.json`` + ``tokenizer_config.json`` with the chat
template in Jinja), so ``AutoTokenizer.from_pretrained(folder).apply_chat_template(messages,
add_generation_prompt=True)`` gives the ids :meth:`~llmstages.tokenizer.ChatTokenizer.encode_prompt` gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import load_output, read_json, readable_by_umask, save_safetensors, write_json
from .model import GPT, GPTConfig, ScalarHead
from .tokenizer import ChatTokenizer, load_tokenizer

HF_CONFIG = "config.json"
SUPPORTED = ("LlamaForCausalLM", "LlamaForSequenceClassification")


def is_hf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a ``config.json`` with a ``model_type``), as opposed to
    a stage output (whose ``config.json`` is a :class:`~llmstages.model.GPTConfig`)."""
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        return False
    try:
        return "model_type" in json.loads(file.read_text())
    except json.JSONDecodeError:
        return False


def is_reward_model(path: str | Path) -> bool:
    """Whether ``path`` holds a reward model: a stage output of the reward stage (``meta.json``), or a Hugging
    Face sequence classifier (``config.json`` ``architectures``).

    Raises:
        ValueError: a broken ``meta.json`` or ``config.json`` (naming the file).
    """
    path = Path(path)
    if is_hf_checkpoint(path):
        return "LlamaForSequenceClassification" in (read_json(path / HF_CONFIG).get("architectures") or [])
    return (path / "meta.json").is_file() and read_json(path / "meta.json").get("stage") == "reward"


def require_transformers(what: str) -> None:
    """Raise a clear error when Hugging Face ``transformers`` (the ``hf`` extra) is not installed.

    Raises:
        ValueError: naming ``what`` needs it and how to install it.
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        from . import HF_INSTALL

        raise ValueError(f"{what} needs Hugging Face transformers, which is not installed: {HF_INSTALL}")


def llama_config(cfg: GPTConfig, tok: ChatTokenizer, reward: bool = False):
    """The ``transformers.LlamaConfig`` of our architecture ``cfg`` with ``tok``'s special tokens; ``reward``:
    a one-label sequence classifier."""
    from transformers import LlamaConfig

    extra = dict(num_labels=1, architectures=["LlamaForSequenceClassification"]) if reward else \
        dict(architectures=["LlamaForCausalLM"])
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu",
                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                       tie_word_embeddings=cfg.tie_embeddings, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, **extra)


def to_llama_state_dict(model: GPT, head: ScalarHead | None = None) -> dict[str, torch.Tensor]:
    """Our weights under the Llama names (table in the module docstring); ``head``: the reward head as
    ``score.weight``."""
    sd, out, L = model.state_dict(), {}, model.cfg.n_layers
    out["model.embed_tokens.weight"] = sd["embed.weight"]
    for i in range(L):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        for name, w in zip(("q_proj", "k_proj", "v_proj"), sd[p + "attn.qkv.weight"].chunk(3)):
            out[q + f"self_attn.{name}.weight"] = w
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "mlp_norm.weight"]
        for name, w in zip(("gate_proj", "up_proj"), sd[p + "mlp.gate_up.weight"].chunk(2)):
            out[q + f"mlp.{name}.weight"] = w
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.down.weight"]
    out["model.norm.weight"] = sd["norm.weight"]
    if head is not None:
        out["score.weight"] = head.linear.weight
    elif not model.cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def from_llama_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_llama_state_dict` for the body: Llama names -> ours (``lm_head.weight`` filled
    from the embedding when tied)."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "attn_norm.weight"] = sd[q + "input_layernorm.weight"]
        out[p + "attn.qkv.weight"] = torch.cat([sd[q + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
        out[p + "attn.proj.weight"] = sd[q + "self_attn.o_proj.weight"]
        out[p + "mlp_norm.weight"] = sd[q + "post_attention_layernorm.weight"]
        out[p + "mlp.gate_up.weight"] = torch.cat([sd[q + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj")])
        out[p + "mlp.down.weight"] = sd[q + "mlp.down_proj.weight"]
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    return out


def export_hf(output: str | Path, folder: str | Path) -> Path:
    """Write the stage output ``output`` (``outputs/<stage>``) to ``folder`` as a Hugging Face checkpoint that
    ``AutoModelForCausalLM`` (or, for a reward model, ``AutoModelForSequenceClassification``) and
    ``AutoTokenizer`` load with no custom code: ``config.json``, ``model.safetensors``, ``generation_config.json``
    (causal LM), the tokenizer files, and ``llmstages.json`` (the stage output's ``meta.json``).

    Raises:
        FileNotFoundError: ``output`` is not a stage output.
        ValueError: ``output`` is already a Hugging Face folder, ``folder`` holds or is inside a stage output
            or holds other files (a folder that is not empty must be an earlier export: it holds ``llmstages.json``), a file of
            ``output`` is broken (see :func:`~llmstages.checkpoint.load_output`), or a reward head has a
            non-zero bias (it has no place in Llama's score head).
    """
    require_transformers("export")
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    output, folder = Path(output), Path(folder)
    if is_hf_checkpoint(output):
        raise ValueError(f"{output} is already a Hugging Face checkpoint ({output / HF_CONFIG}): transformers "
                         "loads it as it is; export takes a stage output such as outputs/sft")
    if (folder / "meta.json").is_file() and not (folder / "llmstages.json").is_file():
        raise ValueError(f"{folder} holds a stage output (meta.json): exporting there would overwrite it; choose "
                         "another folder")
    inside = next((p for p in folder.resolve().parents if (p / "meta.json").is_file()), None)
    if inside is not None:  # a stage output is DVC's: files added inside it change its hash, and dvc checkout drops them
        raise ValueError(f"{folder} is inside the stage output {inside}; choose a folder outside it")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "llmstages.json").is_file():
        raise ValueError(f"{folder} is not empty and not an earlier export (no llmstages.json): exporting there "
                         "would mix its files with the checkpoint's; choose a new or empty folder")
    meta = read_json(output / "meta.json") if (output / "meta.json").is_file() else {}
    reward = meta.get("stage") == "reward"
    model, head, _ = load_output(output, with_head=reward)
    if reward and head.linear.bias is not None and float(head.linear.bias.detach().abs().max()) != 0.0:
        raise ValueError(f"{output}: the reward head has a bias ({float(head.linear.bias):.6g}), which "
                         "LlamaForSequenceClassification's score head lacks (reward models trained since "
                         "2026-12-06 have none): retrain it with `llmstages reward`")
    tok = load_tokenizer(output, keep_template=True)
    config = llama_config(model.cfg, tok, reward)
    hf = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(config)
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(model, head), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:  # a mapping error, not a user error
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    if reward:  # a causal LM exported here before left one; a sequence classifier has none
        (folder / "generation_config.json").unlink(missing_ok=True)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for one small file
    try:
        hf.save_pretrained(folder, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    for f in folder.glob("*.safetensors"):
        readable_by_umask(f)
    tok.save(folder)
    shutil.rmtree(folder / "adapter", ignore_errors=True)  # an earlier export's adapter is not this model's
    if (output / "adapter").is_dir() and not reward:
        export_adapter(output / "adapter", folder / "adapter")
    write_json(folder / "llmstages.json", {**meta, "exported_from": str(output)})
    return folder


#: our LoRA-adapted layers -> (their Llama module, the Llama projections their rows split into)
ADAPTER_NAMES = {"attn.qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "attn.proj": ("self_attn", ("o_proj",)),
                 "mlp.gate_up": ("mlp", ("gate_proj", "up_proj")), "mlp.down": ("mlp", ("down_proj",))}


def export_adapter(adapter: Path, folder: Path) -> Path:
    """Write the LoRA adapter ``adapter`` (``adapter_model.safetensors`` + ``adapter_config.json`` in our layer
    names, :func:`~llmstages.lora.save_adapter`) to ``folder`` as a peft adapter of ``LlamaForCausalLM``
    (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ...; module docstring).

    Raises:
        ValueError: a tensor of the adapter that is not a LoRA ``A``/``B`` of a known layer.
    """
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for key, w in load_file(str(adapter / "adapter_model.safetensors")).items():
        block, _, rest = key.partition(".")  # "blocks", "{i}.attn.qkv.lora_A.weight"
        i, _, rest = rest.partition(".")
        layer, _, ab = rest.rpartition(".lora_")
        if block != "blocks" or layer not in ADAPTER_NAMES or ab not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter / 'adapter_model.safetensors'}: unexpected tensor {key!r}")
        module, names = ADAPTER_NAMES[layer]
        parts = [w] * len(names) if ab == "A.weight" else w.chunk(len(names))
        for name, part in zip(names, parts):
            out[f"base_model.model.model.layers.{i}.{module}.{name}.lora_{ab}"] = part.contiguous().clone()
    config = read_json(adapter / "adapter_config.json")
    config.update(target_modules=sorted({n for _, names in ADAPTER_NAMES.values() for n in names
                                         if any(f".{n}.lora_" in k for k in out)}),
                  task_type="CAUSAL_LM", base_model_name_or_path=None, inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", config)
    return folder


def import_hf(folder: str | Path, with_head: bool = False) -> tuple[GPT, ScalarHead | None, ChatTokenizer]:
    """Load a local Hugging Face Llama-architecture checkpoint (``LlamaForCausalLM``, or
    ``LlamaForSequenceClassification`` with one label for ``with_head``) as our model, float32, on the CPU, with
    its tokenizer (:func:`~llmstages.tokenizer.load_tokenizer`: missing chat-role tokens are added, and the
    embedding grows to hold them, new rows at the mean embedding). Nothing is downloaded.

    Raises:
        FileNotFoundError: no ``config.json`` or tokenizer in ``folder``.
        ValueError: an architecture other than Llama's, or a Llama variant our model does not have (grouped-query
            attention, biases, rope scaling, another activation); the message names the config key.
    """
    require_transformers(f"loading the Hugging Face model {folder}")
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not (folder / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{folder / HF_CONFIG} not found: not a Hugging Face model folder")
    raw = read_json(folder / HF_CONFIG)
    if raw.get("model_type") != "llama":
        raise ValueError(f"{folder / HF_CONFIG}: model_type {raw.get('model_type')!r} is not supported (llama only: "
                         "the architecture llmstages trains)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 1:
            found = "missing" if key not in raw else f"{raw[key]!r}"
            raise ValueError(f"{folder / HF_CONFIG}: {key} is {found}; expected a positive integer (transformers "
                             "would fill in Llama's default and the weights would not fit)")
    try:
        c = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{folder / HF_CONFIG}: transformers cannot read it: {str(err).splitlines()[0]}") from None
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    problems = {"num_key_value_heads": (c.num_key_value_heads or c.num_attention_heads) != c.num_attention_heads,
                "head_dim": head_dim * c.num_attention_heads != c.hidden_size,
                "attention_bias": bool(getattr(c, "attention_bias", False)),
                "mlp_bias": bool(getattr(c, "mlp_bias", False)), "hidden_act": c.hidden_act != "silu",
                "rope_scaling": rope.get("rope_type", rope.get("type", "default")) != "default"}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"{folder / HF_CONFIG}: {', '.join(f'{k}={getattr(c, k, None)!r}' for k in bad)} not "
                         "supported (llmstages' model has one KV head per query head, no biases, SiLU and plain RoPE)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    cfg = GPTConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                    n_heads=c.num_attention_heads, d_ff=c.intermediate_size, max_seq_len=c.max_position_embeddings,
                    rope_theta=float(theta), tie_embeddings=bool(c.tie_word_embeddings), norm_eps=c.rms_norm_eps)
    weights = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) beside {HF_CONFIG}")
    cls = LlamaForSequenceClassification if with_head else LlamaForCausalLM
    hf_logging.disable_progress_bar()  # one stage log, not a "Loading weights" bar per model
    try:
        hf, info = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as err:  # truncated or corrupt file (safetensors' own error type), shapes that do not fit
        raise ValueError(f"{folder}: transformers cannot load the weights ({', '.join(weights)}): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    finally:
        hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", ()) if not (k == "lm_head.weight" and c.tie_word_embeddings)]
    if missing:  # transformers would start them at random
        raise ValueError(f"{folder}: the weights ({', '.join(weights)}) lack {len(missing)} tensor(s) of the model, "
                         f"e.g. {', '.join(sorted(missing)[:3])}")
    sd = hf.state_dict()
    model = GPT.from_weights(cfg, from_llama_state_dict(sd, cfg))
    head = None
    if with_head:
        if "score.weight" not in sd or sd["score.weight"].shape[0] != 1:
            raise ValueError(f"{folder}: not a one-label sequence classifier (num_labels must be 1)")
        head = ScalarHead(cfg.d_model, bias=False)
        with torch.no_grad():
            head.linear.weight.copy_(sd["score.weight"])
    tok = load_tokenizer(folder, keep_template=True)
    grow_vocab(model, tok.vocab_size)
    return model, head, tok


def grow_vocab(model: GPT, vocab_size: int) -> None:
    """Grow ``model``'s embedding (and untied LM head) to ``vocab_size`` rows, new rows at the mean of the old
    ones (a neutral start for tokens such as added chat-role tokens); no-op when it is large enough."""
    old = model.cfg.vocab_size
    if vocab_size <= old:
        return
    with torch.no_grad():
        embed = torch.nn.Embedding(vocab_size, model.cfg.d_model)
        embed.weight[:old] = model.embed.weight
        embed.weight[old:] = model.embed.weight.mean(0)
        model.embed = embed
        if model.cfg.tie_embeddings:
            model.lm_head = torch.nn.Linear(model.cfg.d_model, vocab_size, bias=False)
            model.lm_head.weight = model.embed.weight
        else:
            head = torch.nn.Linear(model.cfg.d_model, vocab_size, bias=False)
            head.weight[:old] = model.lm_head.weight
            head.weight[old:] = model.lm_head.weight.mean(0)
            model.lm_head = head
    model.cfg.vocab_size = vocab_size


def load_model(path: str | Path, with_head: bool = False) -> tuple[GPT, ScalarHead | None, ChatTokenizer]:
    """A stage's starting model: a stage output folder, or a local Hugging Face Llama checkpoint
    (:func:`import_hf`); with its tokenizer.

    Raises:
        FileNotFoundError, ValueError: as :func:`~llmstages.checkpoint.load_output` and :func:`import_hf`.
    """
    if is_hf_checkpoint(path):
        return import_hf(path, with_head)
    model, head, _ = load_output(path, with_head)
    return model, head, load_tokenizer(path, keep_template=True)
