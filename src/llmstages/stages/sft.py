"""Supervised fine-tuning: chat-template conversations, next-token loss on assistant turns only.

Each assistant turn's EOS is supervised, so the model learns to stop. With ``packing``, several examples share
one sequence, each with its own loss mask, positions and attention (no attention across examples); with
``padding_free`` the examples of each (randomly drawn) batch are packed that way when the batch is made, so a
step sees the same examples and loss as a padded batch but computes no padding. Held-out
exact match is measured by greedy generation, for the starting (pretrained) model and for the result.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..checkpoint import save_output
from ..lora import LoRA, add_lora, parameter_counts, unload
from ..export import load_model
from ..data.datasets import (PROMPT_FIELDS, SFTDataset, collate_padding_free, collate_sft, read_jsonl,
                             heldout_loader, shuffled_loader)
from ..data.formats import read_canonical
from ..evaluation import (answer_metrics, eval_subset, generate_answers, heldout_pairs, preference_accuracy,
                          probe_answers)
from ..losses import token_cross_entropy
from ..callbacks import is_log_step
from ..model import GPT
from ..optim import StepMean, adamw_with_schedule, optim_kwargs, param_groups
from ..runtime import CompiledCall, is_rank_zero, seed_everything
from .stage import Stage, check_positions, encoding_metrics, log_encoding


class SFTModule(L.LightningModule):
    """Causal LM fine-tuned with the loss mask of the chat template (response tokens + EOS); ``compile`` runs
    the forward through ``torch.compile``; ``heldout(model)``, when given, scores held-out answers at each
    validation (its ``exact_match*`` values are logged as ``val/exact_match*``)."""

    def __init__(self, model: GPT, optim: dict, compile: bool = False,
                 heldout: Callable[[GPT], dict[str, float]] | None = None) -> None:
        super().__init__()
        self.model, self.optim, self.heldout = model, optim, heldout
        self.heldout_scores: dict[str, float] = {}  # the last validation's ``heldout(model)``
        self.heldout_step = -1  # the optimizer step those scores were taken at
        self.step_mean = StepMean()
        self.hidden_fn = CompiledCall(model.hidden, compile)

    def token_losses(self, batch) -> torch.Tensor:
        """Cross-entropy ``(N,)`` in nats of each of the batch's N supervised tokens. The LM head runs at the
        supervised positions only: their mean is :func:`~llmstages.losses.next_token_loss` of every position's
        logits with the loss mask (same value and gradient) without the prompt positions' share of the head
        (most of a chat example is prompt).

        Raises:
            ValueError: if the batch's ``loss_mask`` has no supervised position.
        """
        supervised = batch["loss_mask"].bool()
        if not bool(supervised.any()):
            raise ValueError("loss_mask has no supervised token in this batch")
        hidden = self.hidden_fn(batch["inputs"], positions=batch.get("positions"), attn_mask=batch.get("attn_mask"))
        logits = self.model.lm_head(hidden[supervised])  # (N, V) for the N supervised positions
        return token_cross_entropy(logits, batch["targets"][supervised])

    def training_step(self, batch, batch_idx):
        return self.step_mean.add(self, self.token_losses(batch))  # every supervised token of the step weighs the same

    def on_before_optimizer_step(self, optimizer):
        loss = self.step_mean.finish(self)  # the step's mean over its supervised tokens
        if is_log_step(self):
            self.log("train/lm_loss", loss, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.log("val/lm_loss", self.token_losses(batch).mean(), prog_bar=True, sync_dist=True)  # mean over processes

    def on_validation_epoch_end(self):
        """Held-out exact match at each validation (``heldout``), so the curve shows when answers are learned;
        not again for unchanged weights (the final validation after one at the last step)."""
        if self.heldout is not None and not self.trainer.sanity_checking \
                and self.trainer.global_step != self.heldout_step:
            self.heldout_scores, self.heldout_step = self.heldout(self.model), self.trainer.global_step
            scores = {k: v for k, v in self.heldout_scores.items() if k.startswith("exact_match") and "_ci95_" not in k}
            # every DDP process scores the same rows with the same weights: the mean is that one value
            self.log_dict({f"val/{k}": v for k, v in scores.items()}, sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_schedule(param_groups(self.model, self.optim["weight_decay"]), **self.optim)


def heldout_answers(model: GPT, tok, rows: list[dict], max_new_tokens: int, pairs=None) -> dict[str, float]:
    """Exact match of greedy answers to the held-out ``rows`` and, given ``pairs`` (``(loader, tasks)`` of
    :func:`~llmstages.evaluation.heldout_pairs`), preference accuracy on those held-out pairs."""
    responses, gens = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    return {**answer_metrics(rows, responses, gens), **(preference_accuracy(model, *pairs) if pairs else {})}


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Fine-tune the model in ``init_from`` on ``<data_dir>/sft_train.jsonl``; return the metrics."""
    seed_everything(cfg.trainer.seed)
    data_dir, init = Path(cfg.data_dir), Path(cfg.init_from)
    model, _, tok = load_model(init)  # a stage output, or a Hugging Face Llama folder
    lora = LoRA(**cfg.lora)
    if lora.on:  # only the adapters train
        add_lora(model, **lora.kwargs())
    check_positions("sft", model.cfg.max_seq_len, init, max_len=cfg.max_len)
    train, val = (SFTDataset(read_canonical(path, "sft"), tok, cfg.max_len, cfg.long_prompt, cfg.packing, str(path))
                  for path in (data_dir / "sft_train.jsonl", data_dir / "sft_val.jsonl"))
    log_encoding("sft", train=train.stats, val=val.stats)
    eval_rows = eval_subset(read_jsonl(data_dir / "prompts_val.jsonl", PROMPT_FIELDS), cfg.eval_limit)
    # Scored by DDP rank 0 only (the other processes only train; they start when rank 0 starts training).
    pairs = heldout_pairs(data_dir / "pref_val.jsonl", tok, model.cfg.max_seq_len, cfg.eval_limit)
    before = heldout_answers(model, tok, eval_rows, cfg.eval_max_new_tokens, pairs) if is_rank_zero() else {}

    stage = Stage("sft", cfg, out_dir, inputs=[data_dir, init])
    module = SFTModule(model, optim_kwargs(cfg), cfg.trainer.compile,
                       partial(heldout_answers, tok=tok, rows=eval_rows, max_new_tokens=cfg.eval_max_new_tokens))
    dl = dict(batch_size=cfg.batch_size, collate_fn=partial(collate_sft, pad_id=tok.pad_id),
              num_workers=cfg.num_workers)
    train_dl = dict(dl, collate_fn=partial(collate_padding_free, pad_id=tok.pad_id, max_len=cfg.max_len)
                    ) if cfg.padding_free and not cfg.packing else dl  # packed items are packed already
    trainer, val_dl = stage.trainer(), DataLoader(val, **dl)
    t = cfg.trainer  # one loader for the whole run: its max_steps * accumulate_grad_batches micro-batches
    train_dl = shuffled_loader(train, t.max_steps * t.accumulate_grad_batches, t.seed, trainer.world_size,
                               trainer.global_rank, **train_dl)
    resumed = stage.fit(trainer, module, train_dl, heldout_loader(val, **dl))  # a sample of every task
    trainer.limit_val_batches = 1.0  # the final score covers the whole held-out set
    val_loss = trainer.validate(module, val_dl, verbose=False)[0]["val/lm_loss"]
    if not trainer.is_global_zero:
        return {}  # another DDP process: rank 0 evaluates and writes the output
    # the final validation above scored the held-out answers of the final model: only the pairs are left
    after = {**module.heldout_scores, **preference_accuracy(module.model, *pairs)}
    metrics = {**after, **{f"init_{k}": v for k, v in before.items()}, **parameter_counts(module.model),
               "val_loss": val_loss,
               "train_examples": train.stats.kept, "train_sequences": len(train), "resumed_from_step": resumed,
               **encoding_metrics(train=train.stats, val=val.stats)}
    probes = list(cfg.probes.prompts)
    stage.log_probes(probes, probe_answers(module.model, tok, probes, cfg.probes.max_new_tokens, chat=True)[0])
    save_output(out_dir, unload(module.model, out_dir), tok, stage.meta(metrics=metrics))
    return stage.finish(metrics)
