"""Exact training: gradient accumulation and DDP are rewrites of one large batch, because a loss that is a mean
over tokens (SFT) or pairs (reward) is taken over every token or pair of the optimizer step
(:class:`llmstages.optim.StepMean`). Real Lightning Trainers; the DDP case runs two real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from llmstages.data.datasets import PreferenceDataset, SFTDataset, collate_padding_free, collate_pairs_padding_free
from llmstages.model import GPT, GPTConfig
from llmstages.optim import StepMean
from llmstages.stages.reward import RewardModule
from llmstages.stages.sft import SFTModule
from llmstages.tokenizer import train_tokenizer

PAD = 0
OPTIM = dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, warmup_steps=1, max_steps=1, min_lr_ratio=1.0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What's 2 + 2? 4. Hello world, a tiny corpus of words and numbers 12 345."] * 20,
                           vocab_size=300)


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


class StepGrads(L.Callback):
    """The parameters' gradients of the (single) optimizer step, read after it (they are zeroed only when the
    next step's first micro-batch starts), and the step's logged training loss (``train/<kind>_loss``)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.grads = torch.cat([p.grad.flatten().clone() for p in module.parameters() if p.grad is not None])


def fit_one_step(module: L.LightningModule, loader, accumulate: int) -> tuple[float, torch.Tensor]:
    """One optimizer step over ``loader``'s first ``accumulate`` batches; returns (logged training loss, gradients)."""
    grads = StepGrads()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, callbacks=[grads])
    trainer.fit(module, loader)
    [key] = [k for k in trainer.callback_metrics if k.startswith("train/") and k.endswith("loss")]
    return float(trainer.callback_metrics[key]), grads.grads


class Toy(L.LightningModule):
    """Per-item losses ``w * batch`` with ``w = 1``: the step's mean loss and ``d loss / d w`` are both the mean
    of the items of the step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.step_mean = StepMean()

    def training_step(self, batch, batch_idx):
        return self.step_mean.add(self, self.w * batch)

    def on_before_optimizer_step(self, optimizer):
        self.log("train/loss", self.step_mean.finish(self))

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.0)


def test_accumulated_micro_batches_weigh_every_item_of_the_step():
    """The issue's case: micro-batch A has 2 supervised tokens of loss 1.0, B 8 of loss 2.0. Accumulated, the
    step's loss and gradient are (2 * 1.0 + 8 * 2.0) / 10 = 1.8, as for one batch of both (not the micro-batch
    mean 1.5)."""
    a, b = torch.full((2,), 1.0), torch.full((8,), 2.0)
    accumulated = fit_one_step(Toy(), DataLoader([a, b], batch_size=None), accumulate=2)
    one_batch = fit_one_step(Toy(), DataLoader([torch.cat([a, b])], batch_size=None), accumulate=1)
    for loss, grad in (accumulated, one_batch):
        assert loss == pytest.approx(1.8, abs=1e-6) and grad.tolist() == pytest.approx([1.8], abs=1e-6)


def test_step_mean_refuses_a_micro_batch_without_items():
    module = Toy()
    with pytest.raises(ValueError, match="no supervised token or pair"):
        module.step_mean.add(module, torch.zeros(0))


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


SFT_ROWS = [chat("What's 2 + 2?", "4"), chat("Hello", "a tiny corpus of words and numbers 12 345 world")]


def test_sft_accumulation_equals_one_batch(tok):
    """SFT, examples of 2 and 14 supervised tokens: batch 1 with 2 accumulated micro-batches logs the token mean
    of the two and has the gradients of one batch of 2 (within 1e-6)."""
    ds = SFTDataset(SFT_ROWS, tok, max_len=64)
    counts = [sum(mask[1:]) for _, mask in ds.items]
    assert counts[0] != counts[1]
    collate = partial(collate_padding_free, pad_id=PAD, max_len=64)
    with torch.no_grad():  # the hand value: every supervised token's loss under the starting model
        per_token = torch.cat([SFTModule(tiny_model(), OPTIM).token_losses(collate([item])) for item in ds.items])
    assert len(per_token) == sum(counts)
    results = [fit_one_step(SFTModule(tiny_model(), OPTIM), DataLoader(ds, batch_size=bs, collate_fn=collate), acc)
               for bs, acc in ((1, 2), (2, 1))]
    for loss, _ in results:
        assert loss == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6, rtol=0)


def test_reward_accumulation_equals_one_batch(tok):
    """Reward model, two pairs: 2 accumulated micro-batches of 1 pair give the step's mean Bradley-Terry loss
    and the gradients of one batch of 2 pairs (within 1e-6)."""
    rows = [{"prompt": "What's 2 + 2?", "chosen": "4", "rejected": "5 or so"},
            {"prompt": "Hello", "chosen": "Hello world", "rejected": "a tiny corpus of numbers 12 345"}]
    ds = PreferenceDataset(rows, tok, max_len=64)
    collate = partial(collate_pairs_padding_free, pad_id=PAD, max_len=64)
    with torch.no_grad():  # the hand value: -log sigmoid(r_chosen - r_rejected) averaged over the two pairs
        chosen, rejected = RewardModule(tiny_model(), OPTIM).scores(collate(ds.items)).chunk(2)
        expected = torch.nn.functional.softplus(rejected - chosen).mean().item()
    results = [fit_one_step(RewardModule(tiny_model(), OPTIM), DataLoader(ds, batch_size=bs, collate_fn=collate), acc)
               for bs, acc in ((1, 2), (2, 1))]
    for loss, _ in results:
        assert loss == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6, rtol=0)


DDP_SCRIPT = """
import json, sys
from functools import partial
import lightning as L, torch
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_exact_training import OPTIM, PAD, SFT_ROWS, StepGrads, tiny_model
from llmstages.data.datasets import SFTDataset, collate_padding_free
from llmstages.stages.sft import SFTModule
from llmstages.tokenizer import train_tokenizer

tok = train_tokenizer(["What's 2 + 2? 4. Hello world, a tiny corpus of words and numbers 12 345."] * 20, vocab_size=300)
ds = SFTDataset(SFT_ROWS, tok, max_len=64)
grads = StepGrads()
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", precision="32-true", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    log_every_n_steps=1, callbacks=[grads], use_distributed_sampler=False)
rank = trainer.global_rank
loader = DataLoader([ds.items[rank]], batch_size=1, collate_fn=partial(collate_padding_free, pad_id=PAD, max_len=64))
trainer.fit(SFTModule(tiny_model(), OPTIM), loader)
if rank == 0:
    json.dump({{"loss": float(trainer.callback_metrics["train/lm_loss"]), "grads": grads.grads.tolist()}},
              open(sys.argv[1], "w"))
"""


def test_sft_two_ddp_processes_of_batch_1_equal_one_process_of_batch_2(tok, tmp_path):
    """Two DDP processes (gloo, CPU) with one example each train as one process with both: the same logged
    token-mean loss and gradients within 1e-6 (each process's loss is divided by the step's token count over
    both processes, not averaged per process)."""
    script = tmp_path / "ddp_sft.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = json.loads(out.read_text())
    ds = SFTDataset(SFT_ROWS, tok, max_len=64)
    loader = DataLoader(ds, batch_size=2, collate_fn=partial(collate_padding_free, pad_id=PAD, max_len=64))
    loss, grads = fit_one_step(SFTModule(tiny_model(), OPTIM), loader, accumulate=1)
    assert ddp["loss"] == pytest.approx(loss, rel=1e-6)
    assert torch.allclose(torch.tensor(ddp["grads"]), grads, atol=1e-6, rtol=0)
