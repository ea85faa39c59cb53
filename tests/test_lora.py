"""LoRA through peft (`lora.r > 0`): in sft, reward and each RL algorithm only the adapters train (and a new
head where the stage has one); the saved output is the base model with the adapters merged, exactly."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose
from llmstages.checkpoint import load_output
from llmstages.lora import AdaptersOff, add_lora, merge_lora
from llmstages.model import GPT, GPTConfig

LORA = ["lora.r=4", "lora.alpha=8"]


def test_adapters_start_at_the_base_model_switch_off_and_merge_exactly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        base = model(x)
    add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["qkv", "down"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "mlp.down")}
    with torch.no_grad():
        assert torch.equal(model(x), base)  # B starts at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        adapted = model(x)
        assert not torch.allclose(adapted, base)
        assert torch.equal(AdaptersOff(model)(x), base)  # the reference: the base model, same weights
        assert torch.equal(model(x), adapted) and all(model.get_parameter(n).requires_grad for n in trainable)
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), adapted, atol=1e-5)


def check_only_adapters_trained(out, base_dir, lora_r=4, alpha=8.0):
    """The output's weights are the base's plus (alpha / r) B A in every adapted layer, the base's elsewhere;
    every B moved from its initial zero."""
    merged, _, _ = load_output(out)
    base, _, _ = load_output(base_dir)
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    layers = {k.split(".lora_")[0] for k in adapter}
    assert layers and len(adapter) == 2 * len(layers)
    m, b = merged.state_dict(), base.state_dict()
    for name in m:
        layer = name.rsplit(".weight", 1)[0]
        if layer in layers:
            A, B = adapter[f"{layer}.lora_A.weight"], adapter[f"{layer}.lora_B.weight"]
            assert B.abs().max() > 0, f"{layer}: adapter B never trained"
            assert torch.allclose(m[name], b[name] + (alpha / lora_r) * B @ A, atol=1e-6), name
        else:
            assert torch.equal(m[name], b[name]), f"{name} changed: only adapters should train"


@pytest.mark.parametrize("stage, extra", [("sft", []), ("reward", []), ("rlhf", ["algorithm=dpo"]),
                                          ("rlhf", ["algorithm=ppo"]), ("rlhf", ["algorithm=grpo"])])
def test_each_stage_trains_only_the_adapters(tiny_run, tmp_path, monkeypatch, stage, extra):
    from llmstages.cli import run_stage

    work, _ = tiny_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("LLMSTAGES_PIPELINE_RUN", "lora-test")
    base_dir = work / "outputs" / {"sft": "pretrain", "reward": "sft", "rlhf": "sft"}[stage]
    args = [*TINY[stage], *LORA, *extra, "logger=none"]
    args += [f"init_from={base_dir}"] if stage != "rlhf" else [f"policy_from={base_dir}"]
    metrics = run_stage(stage, compose(stage, args), str(tmp_path / "out"), source="test")
    check_only_adapters_trained(tmp_path / "out", base_dir)
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 5
    if stage == "reward":  # the score head trains too; the reward model scores with it
        _, head, _ = load_output(tmp_path / "out", with_head=True)
        assert head is not None and head.linear.bias is None


def test_exported_adapter_loads_in_peft_on_the_exported_base_model(tiny_run, tmp_path, monkeypatch):
    """sft with LoRA, exported: ``<export>/adapter`` in Llama names, applied by peft to the export of the
    starting model (the pretrained one), computes the merged export's logits (the fused layers' adapters split
    exactly)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from llmstages.cli import run_stage
    from llmstages.export import export_hf

    work, _ = tiny_run
    monkeypatch.chdir(work)
    base_dir = work / "outputs/pretrain"
    run_stage("sft", compose("sft", [*TINY["sft"], *LORA, "logger=none", f"init_from={base_dir}"]),
              str(tmp_path / "sft"), source="test")
    export_hf(base_dir, tmp_path / "hf-base")
    export_hf(tmp_path / "sft", tmp_path / "hf-sft")
    adapter = load_file(str(tmp_path / "hf-sft/adapter/adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base"),
                                                str(tmp_path / "hf-sft/adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-sft").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base").eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = peft_model(x).logits, merged(x).logits, base(x).logits
    assert (got - want).abs().max() < 1e-4 and (want - before).abs().max() > 1e-3  # it trained, and it matches
    umask = os.umask(0)
    os.umask(umask)  # safetensors' save_file makes 0600 files: every weights file is as readable as the rest
    weights = [tmp_path / "sft/model.safetensors", tmp_path / "sft/adapter/adapter_model.safetensors",
               tmp_path / "hf-sft/model.safetensors", tmp_path / "hf-sft/adapter/adapter_model.safetensors"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in weights} == {f.name: oct(0o666 & ~umask) for f in weights}
    export_hf(base_dir, tmp_path / "hf-sft")  # the same folder again, from an output without LoRA
    assert not (tmp_path / "hf-sft/adapter").exists()  # no adapter left that is not this model's


def test_lora_without_peft_is_a_config_error_that_names_the_extra(monkeypatch):
    """peft is in the ``hf`` extra: a run with LoRA on, where it is missing, stops before training and says how to
    install it; composing params.yaml for another machine is not refused."""
    import sys

    from llmstages.config import ConfigError, validate

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed (importlib finds no spec)
    cfg = compose("sft", [*TINY["sft"], *LORA])
    with pytest.raises(ConfigError, match=r"lora\.r.*needs peft.*pip install -e '\.\[hf\]' in the llmstages folder"):
        validate("sft", cfg, "test", runs_here=True)
    validate("sft", cfg, "test", runs_here=False)
