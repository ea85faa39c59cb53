"""What the speed work must not break: the FLOPs count behind MFU, torch.compile with its eager fallback, a
help that imports no heavy library, host memory reused across steps, and greedy generation with the KV cache
equal to recomputing everything.

Speed itself is measured by the scripts in benchmarks/, never here.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from llmstages.generation import generate, left_pad, positions_from_mask
from llmstages.model import GPT, GPTConfig
from llmstages import runtime
from llmstages.runtime import CompiledCall
from llmstages.stages.pretrain import PretrainModule

from test_cli import run
from conftest import TINY

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


def test_flops_per_token_by_hand():
    # Per block: qkv 32*96 + proj 32*32 + gate_up 32*128 + down 64*32 = 10,240 weights; 2 blocks + LM head 64*32.
    n = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 64 * 32) + 64 * 32
    assert n == 22_528
    assert GPT(GPTConfig(**CFG)).flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16 == 147_456


@pytest.mark.parametrize("units", [False, True])
def test_precision_auto_follows_the_cpus_bf16_units_and_emulated_bf16_warns(monkeypatch, caplog, units):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: units)
    with caplog.at_level(logging.WARNING, logger="llmstages"):
        assert runtime.resolve_precision("auto", "cpu") == ("bf16-mixed" if units else "32-true")
        assert runtime.resolve_precision("32-true", "cpu") == "32-true"
        assert runtime.resolve_precision(32, "cpu") == 32  # trainer.precision=32 on the command line is an int
        assert not caplog.records
        assert runtime.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # the user's choice stands
    assert ("trainer.precision=bf16-mixed on a CPU without AMX" in caplog.text) == (not units)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmstages"):  # no fp16 autocast on a CPU: the fast one, said
        assert runtime.resolve_precision("16-mixed", "cpu") == ("bf16-mixed" if units else "32-true")
    assert "trainer.precision=16-mixed: fp16 autocast does not exist on a CPU; training in " \
        f"{'bf16-mixed' if units else '32-true'} instead" in caplog.text


def test_compiled_call_matches_eager_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    x = torch.randint(0, 64, (2, 10))
    call = CompiledCall(model, True, backend="eager")  # TorchDynamo tracing, no C++ build
    assert call.compiled is not None
    torch.testing.assert_close(call(x), model(x), rtol=0, atol=0)
    keys = set(PretrainModule(GPTConfig(**CFG), {}, 1.0, 1, compile=False).state_dict())
    assert set(PretrainModule(GPTConfig(**CFG), {}, 1.0, 1, compile=True).state_dict()) == keys
    assert all(k.startswith("model.") for k in keys)


def test_compile_failure_falls_back_to_eager_with_a_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code generator for this platform")

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    x = torch.randint(0, 64, (2, 10))
    call = CompiledCall(model, True, name="model", backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="llmstages"):
        out = call(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert call.compiled is None
    assert "torch.compile failed for the model" in caplog.text and "no code generator" in caplog.text
    assert call(x).shape == (2, 10, 64)  # eager from now on


def test_bad_input_under_compile_is_the_models_own_error(caplog):
    model = GPT(GPTConfig(**CFG)).eval()
    call = CompiledCall(model, True, backend="eager")
    with caplog.at_level(logging.WARNING, logger="llmstages"), pytest.raises(ValueError, match="max_seq_len"):
        call(torch.zeros(1, 65, dtype=torch.long))
    assert "compile failed" not in caplog.text


def test_pretrain_with_trainer_compile(tiny_run, tmp_path):
    """The real inductor backend through the CLI: trains, learns as the eager run does, same checkpoint format."""
    work, metrics = tiny_run
    p = run(["pretrain", f"data_dir={work}/outputs/data", "out_dir=outputs/compiled", "logger=none", *TINY["pretrain"],
             "trainer.compile=true"], tmp_path)
    import json

    compiled = json.loads((tmp_path / "outputs/compiled/metrics.json").read_text())
    assert compiled["steps"] == metrics["pretrain"]["steps"]
    assert compiled["val_loss"] == pytest.approx(metrics["pretrain"]["val_loss"], abs=0.02)
    assert "compile failed" not in p.stderr


def test_process_age_is_not_older_than_the_process():
    """The start-up split's clock (runtime.process_age_s): a child's age at its last line is at most the wall time
    the parent saw it run (one 10 ms clock tick of slack), and most of it. psutil's create_time, which adds a boot
    time rounded to whole seconds, read 0.27 s too old on the 2-core EPYC."""
    code = "import os\nfrom llmstages.runtime import process_age_s\nprint(process_age_s(), flush=True)\nos._exit(0)"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - t0
    age = float(out.strip().splitlines()[-1])
    assert wall - 2.0 < age <= wall + 0.011


def test_help_imports_no_torch_lightning_or_trackers():
    code = ("import sys, contextlib, io\nimport llmstages.cli as c\nsys.argv = ['llmstages', '--help']\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    c.main()\n"
            "print(sorted(m for m in ('torch', 'lightning', 'mlflow', 'wandb', 'hydra', 'dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc malloc only")
def test_freed_host_memory_is_reused_without_page_faults():
    """After keep_freed_host_memory, a freed 64 MiB activation is reused: no new zero-filled pages once the heap
    has grown to fit. Before, each allocation is a fresh mmap: 16,384 minor page faults of 4 KiB each.

    The heap takes a few rounds to settle: torch allocates with ``posix_memalign``, whose request is a little
    larger than the chunk an earlier aligned allocation freed, so the first rounds take new memory until the
    freed pieces have merged (3 rounds of 3 allocations here, more on some machines). The test gives it 9 rounds
    and then asks for 3 rounds in a row without new pages."""
    code = """
import resource, torch
from llmstages.runtime import keep_freed_host_memory
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
tuned = keep_freed_host_memory()
rounds = [faults() for _ in range(12)]
print(tuned, before, keep_freed_host_memory(), *rounds)
"""
    tuned, before, again, *rounds = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout.split()
    assert (tuned, again) == ("True", "True")
    assert int(before) >= 3 * 16_384 * 0.9
    assert all(int(f) < 1_000 for f in rounds[-3:]), rounds


def test_kv_cache_greedy_equals_full_recompute():
    """Greedy continuations with the cache (and left padding) equal those of rerunning the whole sequence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
    g = generate(model, prompts, 20, eos_id=-1, pad_id=0, temperature=0.0)
    tokens, mask = left_pad(prompts, 0)
    with torch.inference_mode():
        for _ in range(20):
            T = tokens.shape[1]
            attn = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
            attn |= torch.eye(T, dtype=torch.bool)[None]
            logits = model(tokens, positions=positions_from_mask(mask), attn_mask=attn)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
    assert torch.equal(g.responses, tokens[:, g.prompt_len:])


def test_training_metrics_logged_only_at_the_log_interval_and_the_last_step(tmp_path):
    """``self.log`` costs about 1 ms of Python per call, so the stages call it only on the steps the logger
    writes (every ``log_every_n_steps``-th) and on the last one, whose loss the stage's metrics.json reports."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class LastLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = float(outputs["loss"])

    torch.manual_seed(0)
    optim = dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, warmup_steps=0, max_steps=7,
                 min_lr_ratio=1.0)
    module = PretrainModule(GPTConfig(**CFG), optim, 1.0, 4 * 16)
    data = [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(7)]
    last = LastLoss()
    trainer = L.Trainer(accelerator="cpu", max_steps=7, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="r"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[last])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [int(r["step"]) for r in rows if r.get("train/lm_loss")] == [2, 5]  # steps 3 and 6, counted from 0
    assert float(trainer.callback_metrics["train/lm_loss"]) == pytest.approx(last.loss, abs=1e-6)  # the 7th step
