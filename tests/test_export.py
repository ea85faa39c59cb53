"""Hugging Face interchange: stage outputs exported as `transformers` Llama checkpoints load with no custom code
and compute what llmstages computes; a random `LlamaForCausalLM` folder made with `transformers` (with its own
tokenizer) is fine-tuned by the stages and exports back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose
from llmstages.checkpoint import load_output
from llmstages.evaluation import reward_scores
from llmstages.generation import generate
from llmstages.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
LLMSTAGES = str(Path(sys.executable).parent / "llmstages")
MESSAGES = [{"role": "user", "content": "What's 12 + 7?"}]


def export(output: Path, folder: Path) -> None:
    """``llmstages export`` as a user runs it."""
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    p = subprocess.run([LLMSTAGES, "export", str(output), str(folder)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"-> {folder}" in p.stdout


def prompt_ids(hf_tok) -> list[int]:
    out = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("stage", ["sft", "rlhf"])
def test_exported_causal_lm_loads_in_transformers_with_our_logits_tokens_and_chat_template(tiny_run, tmp_path, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, _ = tiny_run
    export(work / "outputs" / stage, tmp_path / "hf")
    model, _, _ = load_output(work / "outputs" / stage)
    tok = load_tokenizer(work / "outputs" / stage)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"

    ids = tok.encode_prompt(MESSAGES)
    assert prompt_ids(hf_tok) == ids  # the chat template in tokenizer_config.json gives our prompt ids
    x = torch.tensor([ids, tok.encode_chat([*MESSAGES, {"role": "assistant", "content": "19"}])[0][: len(ids)]])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max() < 1e-4

    n = 8  # greedy continuation: the same tokens, up to and including EOS
    g = generate(model, [ids], n, tok.eos_id, tok.pad_id, temperature=0.0)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    ours_tokens = [t for t, m in zip(g.responses[0].tolist(), g.response_mask[0].tolist()) if m]
    assert out[: len(ours_tokens)] == ours_tokens
    meta = json.loads((tmp_path / "hf/llmstages.json").read_text())
    assert meta["stage"] == stage
    umask = os.umask(0)
    os.umask(umask)  # the weights are as readable as every other file (safetensors' save_file makes them 0600)
    files = [f for d in (tmp_path / "hf", work / "outputs" / stage) for f in d.iterdir() if f.is_file()]
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): oct(0o666 & ~umask) for f in files}


def test_exported_reward_model_scores_as_ours(tiny_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work, _ = tiny_run
    export(work / "outputs/reward", tmp_path / "hf")
    model, head, _ = load_output(work / "outputs/reward", with_head=True)
    tok = load_tokenizer(work / "outputs/reward")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    rows = [tok.encode_chat([*MESSAGES, {"role": "assistant", "content": a}])[0] for a in ("19", "It is 19, a sum.")]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        ours = reward_scores(model, head, tokens, mask)
        theirs = hf(input_ids=tokens, attention_mask=mask).logits[:, 0]
    assert hf.config.num_labels == 1 and hf_tok.pad_token_id == tok.pad_id
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours[0], ours[1])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_llama(folder: Path, corpus: Path, template: str | None = None) -> int:
    """A random tiny ``LlamaForCausalLM`` saved by ``transformers`` with a tokenizer of its own (BPE with
    ``<s>``/``</s>`` and no chat-role tokens), as a user would have on disk; with ``template``, a chat model's:
    ``<|im_start|>``/``<|im_end|>`` (its EOS) and that chat template. Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = corpus.read_text(encoding="utf-8", errors="ignore")[:200_000].splitlines()
    chat = ["<|im_start|>", "<|im_end|>"] if template else []
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *chat],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>" if template else
                                   "</s>", unk_token="<unk>", chat_template=template)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         rope_theta=500.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return tok.get_vocab_size()


def test_stages_fine_tune_a_transformers_llama_and_export_it_back(tiny_run, tmp_path, monkeypatch):
    """sft, then a reward model and offline DPO, from a random LlamaForCausalLM folder: our model computes its
    logits (round trip within 1e-5, chat-role tokens added to its vocabulary), every stage trains, and the DPO
    policy exports back and loads in transformers with our logits."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llmstages.cli import run_stage
    from llmstages.export import import_hf

    work, _ = tiny_run
    base = tmp_path / "llama"
    vocab = random_llama(base, work / "outputs/data/sft_train.jsonl")
    model, _, tok = import_hf(base)
    assert model.cfg.vocab_size == tok.vocab_size == vocab + 3  # <|system|>, <|user|>, <|assistant|> added
    assert model.cfg.rope_theta == 500.0 and tok.eos == "</s>"
    x = torch.tensor([tok.encode("What's 12 + 7? 19")])
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(base).eval()(x).logits
        assert (model(x)[..., :vocab] - theirs).abs().max() < 1e-5

    monkeypatch.chdir(tmp_path)
    data = f"data_dir={work}/outputs/data"
    common = ["logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3"]
    sft = run_stage("sft", compose("sft", [*TINY["sft"], data, f"init_from={base}", *common]), "outputs/sft",
                    source="test")
    assert 0 < sft["val_loss"] < float("inf")
    run_stage("reward", compose("reward", [*TINY["reward"], data, "init_from=outputs/sft", *common]),
              "outputs/reward", source="test")
    rl = [*[a for a in TINY["rlhf"] if "every_n_steps" not in a], data, "policy_from=outputs/sft",
          "reward_from=outputs/reward", "algorithm=dpo", "dpo.pairs=offline", "logger=none", "trainer.max_steps=4"]
    metrics = run_stage("rlhf", compose("rlhf", rl), "outputs/rlhf", source="test")
    assert metrics["steps"] == 4

    export(tmp_path / "outputs/rlhf", tmp_path / "back")
    policy, _, _ = load_output(tmp_path / "outputs/rlhf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    rope = getattr(hf.config, "rope_parameters", None) or {"rope_theta": hf.config.rope_theta}
    assert hf.config.vocab_size == vocab + 3 and rope["rope_theta"] == 500.0
    with torch.no_grad():
        assert (policy(x) - hf(x).logits).abs().max() < 1e-4
        assert not torch.allclose(policy(x)[..., :vocab], theirs, atol=1e-3)  # it was trained


def test_a_brought_chat_model_keeps_its_own_chat_template(tiny_run, tmp_path, monkeypatch):
    """A LlamaForCausalLM folder whose tokenizer has a ChatML template: the import keeps it (no role tokens
    added), our ids equal ``apply_chat_template``'s, the loss mask covers exactly the assistant turns up to their
    EOS (``<|im_end|>``), and sft trains with it and exports it back."""
    from transformers import AutoTokenizer

    from llmstages.cli import run_stage
    from llmstages.export import import_hf

    work, _ = tiny_run
    base = tmp_path / "chat-llama"
    vocab = random_llama(base, work / "outputs/data/sft_train.jsonl", template=CHATML)
    _, _, tok = import_hf(base)
    assert tok.template == CHATML and tok.vocab_size == vocab and tok.eos == "<|im_end|>"  # nothing added
    theirs = AutoTokenizer.from_pretrained(base)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 12 + 7?"},
            {"role": "assistant", "content": "It is 19."}]

    def hf_ids(messages, generation_prompt):
        out = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ids, mask = tok.encode_chat(conv)
    assert ids == hf_ids(conv, False) and len(mask) == len(ids)
    turns = theirs.decode([t for t, m in zip(ids, mask) if m])
    assert turns == "4<|im_end|>It is 19.<|im_end|>"  # the "\n" after each <|im_end|> is not learned
    assert tok.encode_prompt(conv[:2]) == hf_ids(conv[:2], True)
    assert tok.encode_prompt(conv[:2]) + tok.encode_response(conv[:2], "4") == ids[: len(hf_ids(conv[:3], False)) - 1]
    assert theirs.decode(tok.encode_prompt("Hi")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    monkeypatch.chdir(tmp_path)
    sft = run_stage("sft", compose("sft", [*TINY["sft"], f"data_dir={work}/outputs/data", f"init_from={base}",
                                           "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=2"]),
                    "outputs/sft", source="test")
    assert 0 < sft["val_loss"] < float("inf")
    assert load_tokenizer(tmp_path / "outputs/sft", keep_template=True).template == CHATML
    export(tmp_path / "outputs/sft", tmp_path / "back")
    back = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.chat_template == CHATML and back.apply_chat_template(conv, tokenize=False) == theirs.apply_chat_template(
        conv, tokenize=False)


def test_import_refuses_llama_variants_our_model_lacks(tmp_path):
    from transformers import LlamaConfig

    from llmstages.export import import_hf

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        import_hf(tmp_path)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    return subprocess.run([LLMSTAGES, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_bad_exports_and_imports_fail_in_one_line_naming_the_file(tiny_run, tmp_path):
    """Each bad case exits non-zero before writing anything, in one line that names the path or key at fault."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstages.export import import_hf

    work, _ = tiny_run
    sft = tmp_path / "sft"
    shutil.copytree(work / "outputs/sft", sft)
    (tmp_path / "afile").write_text("x")

    def refused(*args: str, match: str) -> None:
        p = run_cli("export", *args)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert match in p.stderr, p.stderr[-2000:]

    refused(str(sft), str(tmp_path / "afile" / "hf"), match=f"{tmp_path / 'afile'} is not a folder")
    refused(str(sft), str(tmp_path / "afile"), match="is not a folder")
    other = tmp_path / "other"
    shutil.copytree(sft, other)
    refused(str(sft), str(other), match=f"{other} holds a stage output")
    assert (other / "meta.json").is_file()  # nothing overwritten
    refused(str(sft), str(other / "hf"), match=f"{other / 'hf'} is inside the stage output {other.resolve()}")
    assert not (other / "hf").exists()  # a DVC-tracked output stays as dvc.lock records it
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    refused(str(sft), str(tmp_path / "notes"), match=f"{tmp_path / 'notes'} is not empty and not an earlier export")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]
    export(sft, tmp_path / "hf")
    refused(str(tmp_path / "hf"), str(tmp_path / "hf2"), match="is already a Hugging Face checkpoint")
    p = run_cli("export", str(work / "outputs/reward"), str(tmp_path / "rm"))
    assert p.returncode == 0 and "AutoModelForSequenceClassification.from_pretrained" in p.stdout

    broken = tmp_path / "broken"
    shutil.copytree(sft, broken)
    (broken / "config.json").write_text('{"d_model": 32,\n "n_layers": }')
    refused(str(broken), str(tmp_path / "x"), match=f"{broken / 'config.json'}:2:")
    config = json.loads((sft / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_heads"}))
    refused(str(broken), str(tmp_path / "x"), match=f"{broken / 'config.json'}: missing key(s) n_heads")
    (broken / "config.json").write_text((sft / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((sft / "model.safetensors").read_bytes()[:1000])
    refused(str(broken), str(tmp_path / "x"), match=f"{broken / 'model.safetensors'}: cannot be read")
    assert not (tmp_path / "x").exists()

    # Hugging Face folders: a missing key transformers would default, broken JSON, no or truncated weights.
    hf = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="hidden_size is missing"):
        import_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
    with pytest.raises(ValueError, match="hidden_size is '32'"):
        import_hf(hf)
    (hf / "config.json").write_text('{"model_type": "llama",,}')
    with pytest.raises(ValueError, match=r"config.json:1:\d+: not valid JSON"):
        import_hf(hf)
    (hf / "config.json").write_text(json.dumps(config))
    weights = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="transformers cannot load the weights"):
        import_hf(hf)
    (hf / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        import_hf(hf)


def test_export_and_import_without_transformers_name_the_extra(tiny_run, tmp_path, monkeypatch):
    """transformers is in the ``hf`` extra: where it is missing, export and import fail in one line that says how
    to install it, and nothing is written."""
    import sys

    from llmstages.export import export_hf, import_hf

    work, _ = tiny_run
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (importlib finds no spec)
    with pytest.raises(ValueError, match=r"export needs Hugging Face transformers.*pip install -e '\.\[hf\]' in the llmstages folder"):
        export_hf(work / "outputs/sft", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match=r"needs Hugging Face transformers.*\.\[hf\]"):
        import_hf(tmp_path)
