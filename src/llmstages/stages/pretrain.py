"""Pretraining: next-token prediction (causal LM cross-entropy) on random windows of the token files.

Logs train/val loss (nats per token), perplexity, bits per byte and tokens/s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..checkpoint import save_output
from ..data.datasets import TokenWindows
from ..evaluation import probe_answers
from ..losses import next_token_loss, token_cross_entropy
from ..tokenizer import load_tokenizer
from ..callbacks import is_log_step
from ..model import GPT, GPTConfig
from ..optim import StepMean, adamw_with_schedule, optim_kwargs, param_groups
from ..runtime import CompiledCall, seed_everything
from .stage import Stage


class PretrainModule(L.LightningModule):
    """Causal LM trained with next-token loss; ``bytes_per_token`` converts nats/token to bits/byte; ``compile``
    runs the training forward through ``torch.compile`` (see :class:`~llmstages.runtime.CompiledCall`)."""

    def __init__(self, model_cfg: GPTConfig, optim: dict, bytes_per_token: float, tokens_per_step: int,
                 compile: bool = False) -> None:
        super().__init__()
        self.model = GPT(model_cfg)
        self.forward_fn = CompiledCall(self.model, compile)
        self.optim, self.bytes_per_token, self.tokens_per_step = optim, bytes_per_token, tokens_per_step
        self._t0: float | None = None
        self.step_mean = StepMean()

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) each
        # every token of the optimizer step weighs the same, across gradient accumulation and DDP
        return self.step_mean.add(self, token_cross_entropy(self.forward_fn(x).flatten(0, 1), y.flatten()))

    def on_before_optimizer_step(self, optimizer):
        loss = self.step_mean.finish(self)  # the step's mean over its tokens
        if is_log_step(self):
            self.log("train/lm_loss", loss, prog_bar=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.trainer.log_every_n_steps
        if self.global_step % every == 0:
            now = time.perf_counter()
            if self._t0 is not None:
                self.log("train/tokens_per_sec", every * self.tokens_per_step / (now - self._t0))
            self._t0 = now

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = next_token_loss(self.forward_fn(x), y)
        self.log("val/lm_loss", loss, prog_bar=True, sync_dist=True)  # mean over DDP processes

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/lm_loss")
        if loss is not None:
            self.log("val/perplexity", torch.exp(loss), sync_dist=True)
            self.log("val/bits_per_byte", loss / math.log(2) / self.bytes_per_token, sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_schedule(param_groups(self.model, self.optim["weight_decay"]), **self.optim)


@torch.no_grad()
def evaluate_loss(model: GPT, data: TokenWindows, batch_size: int, max_batches: int) -> float:
    """Mean next-token loss (nats/token) over the first ``max_batches`` batches of ``data``."""
    model.eval()
    losses = []
    for i, (x, y) in enumerate(DataLoader(data, batch_size=batch_size)):
        if i >= max_batches:
            break
        losses.append(float(next_token_loss(model(x), y)))
    return sum(losses) / len(losses)


def data_meta(data_dir: Path) -> dict:
    """The data stage's ``meta.json`` in ``data_dir``.

    Raises:
        FileNotFoundError: no ``meta.json`` there.
        ValueError: a ``meta.json`` that is not the data stage's (another stage's output folder), naming it.
    """
    path = data_dir / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data_dir={data_dir} should be the data stage's output "
                                "(run `llmstages data` or `dvc repro data` first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("vocab_size", "val_tokens", "val_bytes", "unigram_entropy_nats") if k not in meta]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: data_dir={data_dir} is not a data stage output"
                         + (f" (it is the {meta['stage']} stage's)" if isinstance(meta.get("stage"), str) else ""))
    return meta


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train from scratch on ``<data_dir>/train.bin``; write the model to ``out_dir``; return the metrics."""
    seed_everything(cfg.trainer.seed)
    data_dir = Path(cfg.data_dir)
    meta = data_meta(data_dir)
    model_kwargs = dict(cfg.model)
    model_kwargs["vocab_size"] = model_kwargs["vocab_size"] or meta["vocab_size"]
    if model_kwargs["vocab_size"] < meta["vocab_size"]:
        raise ValueError(f"model.vocab_size={model_kwargs['vocab_size']} < tokenizer vocabulary {meta['vocab_size']}")
    if cfg.seq_len > model_kwargs["max_seq_len"]:
        raise ValueError(f"seq_len={cfg.seq_len} > model.max_seq_len={model_kwargs['max_seq_len']}")
    model_cfg = GPTConfig(**model_kwargs)
    tok = load_tokenizer(data_dir)  # before training: a missing or broken tokenizer fails fast
    t = cfg.trainer
    dtype = meta.get("dtype", "uint16")
    val = TokenWindows(data_dir / "val.bin", cfg.seq_len, t.limit_val_batches * cfg.batch_size, seed=t.seed + 1,
                       dtype=dtype)
    bytes_per_token = meta["val_bytes"] / max(1, meta["val_tokens"])
    stage = Stage("pretrain", cfg, out_dir, inputs=[data_dir])
    module = PretrainModule(model_cfg, optim_kwargs(cfg), bytes_per_token, cfg.batch_size * cfg.seq_len, t.compile)
    trainer = stage.trainer()
    # Windows for the whole run: under DDP each of the world_size processes reads its share of them.
    n_train = t.max_steps * cfg.batch_size * t.accumulate_grad_batches * trainer.world_size
    train = TokenWindows(data_dir / "train.bin", cfg.seq_len, n_train, seed=t.seed, dtype=dtype)
    dl = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=t.accelerator != "cpu")
    # A stateful loader: its position is saved in the checkpoint, so a resumed run goes on with the next window
    # (Lightning restarts a plain DataLoader from its first batch). Under DDP, process r reads windows r, r + W,
    # ... in order (Lightning's own sampler would shuffle them): the W processes' batches together are the
    # windows that one process with W times the batch would read.
    sampler = DistributedSampler(train, trainer.world_size, trainer.global_rank, shuffle=False) \
        if trainer.world_size > 1 else None
    resumed = stage.fit(trainer, module, StatefulDataLoader(train, sampler=sampler, shuffle=False, **dl),
                        DataLoader(val, **dl))
    if not trainer.is_global_zero:
        return {}  # another DDP process: rank 0 evaluates and writes the output
    val_loss = evaluate_loss(module.model, val, cfg.batch_size, t.limit_val_batches)
    if not math.isfinite(val_loss) or val_loss > 100:  # uniform over 2**20 tokens is 13.9 nats
        raise ValueError(f"pretrain diverged: val_loss={val_loss:.4g} nats/token after {trainer.global_step} steps "
                         f"(optim.lr={cfg.optim.lr}); lower optim.lr or raise optim.warmup_steps")
    metrics = {
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "val_bits_per_byte": val_loss / math.log(2) / bytes_per_token,
        "unigram_entropy_nats": meta["unigram_entropy_nats"],
        "train_loss": float(trainer.callback_metrics.get("train/lm_loss", float("nan"))),
        "tokens_seen": trainer.global_step * cfg.batch_size * cfg.seq_len * t.accumulate_grad_batches
        * trainer.world_size,
        "steps": trainer.global_step,
        "resumed_from_step": resumed,
        "params": module.model.num_params(non_embedding=False),
    }
    probes = list(cfg.probes.prompts)
    stage.log_probes(probes, probe_answers(module.model, tok, probes, cfg.probes.max_new_tokens, chat=False)[0])
    save_output(out_dir, module.model, tok, stage.meta(metrics=metrics))
    return stage.finish(metrics)
