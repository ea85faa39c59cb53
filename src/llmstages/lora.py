"""LoRA adapters through ``peft`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):
each targeted linear layer ``W`` computes ``W x + (alpha / r) B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``
(``B`` starts at zero, so training starts from the loaded model); only ``A`` and ``B`` train.

``lora.r > 0`` in the sft, reward and rlhf configs turns it on (off by default). The names in
``lora.target_modules`` are our layers: ``qkv`` (the fused query/key/value projection), ``proj`` (attention
output), ``gate_up`` (the fused SwiGLU input) and ``down``. A stage with LoRA saves the merged model as its output
(what the next stage and ``llmstages export`` read) and the adapter alone in ``<output>/adapter/``
(``adapter_model.safetensors`` + peft's ``adapter_config.json``, in llmstages' layer names).

In rlhf the reference model of the KL penalty is the policy itself with its adapters switched off
(:class:`AdaptersOff`): no second copy of the weights in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import save_safetensors

TARGETS = ("qkv", "proj", "gate_up", "down")


@dataclass
class LoRA:
    """LoRA settings (``lora`` in a stage config; ``conf/lora/default.yaml``): rank ``r`` (0: off), scale
    ``alpha`` (the adapter's output is multiplied by ``alpha / r``), ``dropout`` on the adapter's input, and the
    layers adapted (``target_modules``, of :data:`TARGETS`)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))

    @property
    def on(self) -> bool:
        return self.r > 0

    def kwargs(self) -> dict:
        return asdict(self)


def check_lora(lora, runs_here: bool = False) -> list[tuple[str, str]]:
    """Problems ``(key, message)`` with the ``lora`` settings (``r``, ``alpha``, ``dropout``, ``target_modules``);
    ``runs_here``: also that ``peft`` (the ``hf`` extra) is installed when LoRA is on."""
    import importlib.util

    problems = []
    if lora.r < 0:
        problems.append(("lora.r", f"must be >= 0 (0: off), got {lora.r}"))
    elif lora.r > 0 and runs_here and importlib.util.find_spec("peft") is None:
        from . import HF_INSTALL

        problems.append(("lora.r", f"LoRA (r={lora.r}) needs peft, which is not installed: {HF_INSTALL}"))
    if lora.alpha <= 0:
        problems.append(("lora.alpha", f"must be > 0, got {lora.alpha}"))
    if not 0 <= lora.dropout < 1:
        problems.append(("lora.dropout", f"must be in [0, 1), got {lora.dropout}"))
    unknown = [m for m in lora.target_modules if m not in TARGETS]
    if unknown or not lora.target_modules:
        problems.append(("lora.target_modules", f"expected a non-empty list of {', '.join(TARGETS)}, got "
                                                f"{list(lora.target_modules)}"))
    return problems


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Inject LoRA adapters of rank ``r`` into ``model``'s ``target_modules`` in place and freeze every other
    parameter; returns ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_config = config
    return model


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "lora_config")


def parameter_counts(*modules: nn.Module) -> dict[str, int]:
    """``{"trainable_params", "total_params"}`` over ``modules`` (shared tensors counted once)."""
    seen = {id(p): p for m in modules if m is not None for p in m.parameters()}
    return {"trainable_params": sum(p.numel() for p in seen.values() if p.requires_grad),
            "total_params": sum(p.numel() for p in seen.values())}


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base model: every LoRA adapter off inside the block (their ``requires_grad`` is
    restored after)."""
    layers = [m for _, m in _lora_layers(model)]
    trainable = [p.requires_grad for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in zip((p for m in layers for p in m.parameters()), trainable):
            p.requires_grad_(flag)


class AdaptersOff:
    """The frozen base model under a LoRA-adapted ``model``, as a reference model: calls (``forward``, ``hidden``)
    run with the adapters off; everything else (``cfg``, ``lm_head``, ``parameters``) is ``model``'s. Not an
    ``nn.Module``, so a LightningModule holding it neither registers nor saves the weights twice, and freezing
    it (:func:`~llmstages.model.freeze`) leaves the adapters trainable."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def hidden(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model.hidden(*args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True) -> "AdaptersOff":
        return self  # the base weights are frozen already; the adapters belong to the policy

    def eval(self) -> "AdaptersOff":
        return self

    def train(self, mode: bool = True) -> "AdaptersOff":
        return self

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s adapter weights (``adapter_model.safetensors``) and peft's ``adapter_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n.replace(".default.", "."): p.detach().cpu().contiguous()  # peft's saved names: no adapter name
               for n, p in model.state_dict().items() if "lora_" in n}
    save_safetensors(tensors, folder / "adapter_model.safetensors")
    model.lora_config.save_pretrained(str(folder))
    return folder


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W + (alpha / r) B A``) and put the plain layer back, in place:
    the result is the model without peft; returns ``model``."""
    for name, layer in _lora_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def unload(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """A stage's final model as it is saved: with adapters, they are written to ``<out_dir>/adapter`` and
    merged into the weights (:func:`merge_lora`); returns the plain model (``model`` itself, changed in place)."""
    if not has_lora(model):
        return model
    save_adapter(model, Path(out_dir) / "adapter")
    return merge_lora(model)
