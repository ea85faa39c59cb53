"""Reward model: the SFT backbone plus a scalar head, trained on preference pairs with the Bradley–Terry loss.

The reward of a sequence is the head's output at its last non-padding token (Ouyang et al. 2022, §3.5). With
``padding_free`` each training batch's sequences are packed into rows, each attending only to itself.
Logs pairwise accuracy (chosen scored above rejected) on held-out pairs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..checkpoint import save_output
from ..lora import LoRA, add_lora, parameter_counts, unload
from ..export import load_model
from ..data.datasets import (PreferenceDataset, collate_pairs, collate_pairs_padding_free, heldout_loader,
                             shuffled_loader)
from ..data.formats import read_canonical
from ..evaluation import per_task, probe_answers, probe_rewards
from ..losses import bradley_terry_loss
from ..callbacks import is_log_step
from ..model import GPT, ScalarHead, last_token_index
from ..optim import StepMean, adamw_with_schedule, optim_kwargs, param_groups
from ..runtime import CompiledCall, seed_everything
from .stage import Stage, check_positions, encoding_metrics, log_encoding


class RewardModule(L.LightningModule):
    """Scores ``(2B,)`` for a batch of chosen rows followed by rejected rows; loss ``-log σ(r_c - r_r)``.
    ``compile`` runs the model's hidden states through ``torch.compile``."""

    def __init__(self, model: GPT, optim: dict, compile: bool = False) -> None:
        super().__init__()
        self.model, self.head, self.optim = model, ScalarHead(model.cfg.d_model, bias=False), optim
        self.hidden_fn = CompiledCall(model.hidden, compile)
        self.step_mean = StepMean()
        self.pair_hits: list[bool] | None = None  # a list: validation appends each pair's outcome, in loader order

    def scores(self, batch: dict) -> torch.Tensor:
        """Reward ``(2B,)`` of each sequence of a :func:`~llmstages.data.datasets.collate_pairs` batch (right-padded
        ``tokens``/``mask`` ``(2B, T)``) or a :func:`~llmstages.data.datasets.collate_pairs_padding_free` one
        (packed rows and each sequence's ``last`` (row, column)), read at the sequence's last token."""
        if "last" in batch:
            h = self.hidden_fn(batch["tokens"], positions=batch["positions"], attn_mask=batch["attn_mask"])
            return self.head(h)[batch["last"][:, 0], batch["last"][:, 1]]
        h = self.hidden_fn(batch["tokens"])  # right padding: causal attention never sees the pads before the end
        return self.head(h).gather(1, last_token_index(batch["mask"])[:, None]).squeeze(1)

    def training_step(self, batch, batch_idx):
        chosen, rejected = self.scores(batch).chunk(2)
        if is_log_step(self):  # the step's loss is logged once its every pair is in (on_before_optimizer_step)
            self.log("train/accuracy", (chosen > rejected).float().mean(), prog_bar=True)
            self.log("train/margin", (chosen - rejected).mean())
        # every pair of the optimizer step weighs the same, across gradient accumulation and DDP
        return self.step_mean.add(self, bradley_terry_loss(chosen, rejected, reduction="none"))

    def on_before_optimizer_step(self, optimizer):
        loss = self.step_mean.finish(self)  # the step's mean Bradley-Terry loss over its pairs
        if is_log_step(self):
            self.log("train/bt_loss", loss, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        chosen, rejected = self.scores(batch).chunk(2)  # logged as the mean over batches and DDP processes
        self.log("val/bt_loss", bradley_terry_loss(chosen, rejected), prog_bar=True, sync_dist=True)
        self.log("val/accuracy", (chosen > rejected).float().mean(), prog_bar=True, sync_dist=True)
        self.log("val/margin", (chosen - rejected).mean(), sync_dist=True)
        if self.pair_hits is not None:
            self.pair_hits += (chosen > rejected).tolist()

    def configure_optimizers(self):
        groups = param_groups(self.model, self.optim["weight_decay"]) + [{"params": self.head.parameters(),
                                                                          "weight_decay": 0.0}]
        return adamw_with_schedule(groups, **self.optim)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train a reward model from ``init_from`` on ``<data_dir>/pref_train.jsonl``; return the metrics."""
    seed_everything(cfg.trainer.seed)
    data_dir, init = Path(cfg.data_dir), Path(cfg.init_from)
    model, _, tok = load_model(init)  # a stage output, or a Hugging Face Llama folder
    lora = LoRA(**cfg.lora)
    if lora.on:  # only the adapters (and the new score head) train
        add_lora(model, **lora.kwargs())
    check_positions("reward", model.cfg.max_seq_len, init, max_len=cfg.max_len)
    train, val = (PreferenceDataset(read_canonical(path, "preference"), tok, cfg.max_len, cfg.long_prompt, str(path))
                  for path in (data_dir / "pref_train.jsonl", data_dir / "pref_val.jsonl"))
    log_encoding("reward", train=train.stats, val=val.stats)
    probes = list(cfg.probes.prompts)  # answered by the SFT model, scored by the reward model once trained
    probe_texts, probe_gen = probe_answers(model, tok, probes, cfg.probes.max_new_tokens, chat=True)
    stage = Stage("reward", cfg, out_dir, inputs=[data_dir, init])
    module = RewardModule(model, optim_kwargs(cfg), cfg.trainer.compile)
    dl = dict(batch_size=cfg.batch_size, collate_fn=partial(collate_pairs, pad_id=tok.pad_id),
              num_workers=cfg.num_workers)
    train_dl = dict(dl, collate_fn=partial(collate_pairs_padding_free, pad_id=tok.pad_id, max_len=cfg.max_len)
                    ) if cfg.padding_free else dl
    trainer = stage.trainer()
    val_dl = DataLoader(val, **dl)  # in file order, as val.tasks lists the pairs' tasks
    t = cfg.trainer  # one loader for the whole run: its max_steps * accumulate_grad_batches micro-batches
    train_dl = shuffled_loader(train, t.max_steps * t.accumulate_grad_batches, t.seed, trainer.world_size,
                               trainer.global_rank, **train_dl)
    resumed = stage.fit(trainer, module, train_dl, heldout_loader(val, **dl))  # a sample of every task
    trainer.limit_val_batches = 1.0  # the final score covers the whole held-out set
    module.pair_hits = []  # the final pass keeps each pair's outcome: the accuracy of each task, same precision
    final = trainer.validate(module, val_dl, verbose=False)[0]  # pair-weighted over the whole held-out set
    if not trainer.is_global_zero:
        return {}  # another DDP process: rank 0 writes the output
    metrics = {**parameter_counts(module.model, module.head), "val_accuracy": final["val/accuracy"],
               **per_task("val_accuracy", module.pair_hits, val.tasks),
               "val_loss": final["val/bt_loss"], "val_margin": final["val/margin"],
               "train_pairs": len(train), "val_pairs": len(val), "resumed_from_step": resumed,
               **encoding_metrics(train=train.stats, val=val.stats)}
    stage.log_probes(probes, probe_texts, probe_rewards(module.model, module.head, probe_gen))
    save_output(out_dir, unload(module.model, out_dir), tok, stage.meta(metrics=metrics), head=module.head)
    return stage.finish(metrics)
