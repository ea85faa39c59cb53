"""``Stage``: the plumbing of one stage run that every stage shares: its run folder and tracking runs, the
Trainer with resumable checkpoints, and the output (metrics, config, lineage).

A stage's ``run(cfg, out_dir)`` builds its LightningModule and data, then calls :meth:`Stage.fit` and
:meth:`Stage.finish`. The Lightning Trainer owns the loop; checkpoints for resume live in
``outputs/checkpoints/<stage>-<config hash>/`` (outside the DVC-owned output, which DVC clears before a
rerun), so a stage killed mid-run and started again with the same config resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..callbacks import LearningRate, StageClock, StepProgressBar
from ..checkpoint import write_json
from ..runtime import is_rank_zero, keep_freed_host_memory, process_age_s, resolve_precision
from ..lineage import combined_md5, lineage_tags, tree_md5s
from ..tracking import (end_parent_runs, git_commit, in_pipeline, log_datasets, log_lineage, log_model, log_summary,
                        log_table, make_loggers, pipeline_run_id, project_path, run_ids, skip_logged_steps,
                        start_system_metrics, stop_system_metrics, tag_output, where_tracked)

log = logging.getLogger("llmstages")


def log_encoding(stage: str, **sets) -> None:
    """Log one line per encoded set: rows read, kept, truncated, dropped per reason, tokens; a warning when more
    than a tenth of its rows were truncated (the stage's ``max_len`` is short for this data or tokenizer)."""
    for name, stats in sets.items():
        line = ", ".join(f"{k} {v}" for k, v in stats.summary().items())
        if stats.truncated > 0.1 * max(stats.read, 1):
            log.warning("%s %s set: %s: %.0f%% of the rows were truncated (raise the stage's max_len)", stage, name,
                        line, 100 * stats.truncated / stats.read)
        else:
            log.info("%s %s set: %s", stage, name, line)

def encoding_metrics(**sets) -> dict[str, int]:
    """``{"<set>_<count>": n}`` for each set's :meth:`~llmstages.data.datasets.EncodeStats.summary`."""
    return {f"{name}_{k}": v for name, stats in sets.items() for k, v in stats.summary().items()}

def check_positions(stage: str, max_seq_len: int, model_dir: str | Path, **lengths: int) -> None:
    """Refuse, before any training, a length setting longer than the model's positions.

    Args:
        stage: the config section, e.g. ``"sft"`` or ``"rlhf.dpo"``; named in the message with the key.
        max_seq_len: the positions of the model loaded from ``model_dir``.
        lengths: config key -> tokens it asks for (e.g. ``max_len=128``).

    Raises:
        ValueError: naming the first key whose value exceeds ``max_seq_len``.
    """
    for key, n in lengths.items():
        if n > max_seq_len:
            raise ValueError(f"{stage}.{key}={n} is longer than the {max_seq_len} positions of the model in "
                              f"{model_dir} (its max_seq_len): set {key} to at most {max_seq_len}")


def config_hash(cfg: DictConfig, *paths: str | Path) -> str:
    """Short hash of the resolved config and of the listed input files' sizes and mtimes."""
    h = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode())
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# What each stage does, for its tracking run's description.
DESCRIPTIONS = {"data": "tokenizer, token files and the SFT / preference / RL-prompt sets from the corpus",
                "pretrain": "causal LM pretraining (next-token prediction) on the token files",
                "sft": "supervised fine-tuning on chat pairs, loss on the answer only",
                "reward": "Bradley-Terry reward model on preference pairs",
                "rlhf": "RLHF ({algorithm}) against the reward model with a KL penalty to the SFT model"}

# The files of the data folder each stage reads (its MLflow dataset inputs; *_val: context "eval").
DATA_FILES = {"pretrain": ("train.bin", "val.bin"), "sft": ("sft_train.jsonl", "sft_val.jsonl"),
              "reward": ("pref_train.jsonl", "pref_val.jsonl"),
              "rlhf": ("prompts_train.jsonl", "prompts_val.jsonl", "pref_train.jsonl", "pref_val.jsonl")}

_OPEN: list["Stage"] = []  # stages started in this process and not finished (their tracking runs are open)


def fail_open_stages(interrupted: bool = False) -> None:
    """Mark the tracking runs of unfinished stages as failed (called by the CLI when a stage raises);
    ``interrupted`` (Ctrl-C, SIGTERM): also say what a rerun of the same command will do, resume from the last
    checkpoint or, where none was written yet, start again from step 0."""
    while _OPEN:
        stage = _OPEN.pop()
        if interrupted and stage.rank_zero and "trainer" in stage.cfg:
            last = stage.ckpt_dir / "last.ckpt"
            every = stage.cfg.trainer.checkpoint_every_n_steps
            log.warning("%s: stopped. %s", stage.name, f"The same command resumes from the last checkpoint ({last})."
                        if last.is_file() else f"No checkpoint was written yet (one every {every} steps): the same "
                        "command starts again from step 0.")
        try:
            stop_system_metrics(stage.monitors)
            for lg in stage.loggers:
                lg.finalize("failed")
            end_parent_runs(stage.loggers, "FAILED")
        except Exception as err:  # noqa: BLE001  (the error that failed the stage is the one to report)
            log.warning("%s: could not mark the tracking runs failed: %s", stage.name, err)

class Stage:
    """Plumbing of one stage run: loggers, Trainer with resumable checkpoints, metrics and outputs.

    Raises:
        ValueError: when ``out_dir`` is one of ``inputs`` or holds one (writing the output would overwrite it).
    """

    def __init__(self, name: str, cfg: DictConfig, out_dir: str | Path, inputs: list[str | Path]) -> None:
        self.name, self.cfg, self.out_dir = name, cfg, Path(out_dir)
        out = self.out_dir.resolve()
        for inp in inputs:
            if out == Path(inp).resolve() or out in Path(inp).resolve().parents:
                raise ValueError(f"out_dir={out_dir} is or holds this stage's input {inp}: writing the output there "
                                 "would overwrite it; choose another folder")
        self.rank_zero = is_rank_zero()  # under DDP the other ranks only train: no trackers, lineage or log lines
        keep_freed_host_memory()
        self.pipeline_run = pipeline_run_id()
        commit, dirty = git_commit()
        self.tags = {"stage": name, "pipeline_run": self.pipeline_run, "git_commit": commit,
                     "git_dirty": str(dirty) if commit != "unknown" else "unknown"}  # no repo: nothing to be dirty
        env_tags = {"dvc_exp_name": "DVC_EXP_NAME", "sweep": "LLMSTAGES_SWEEP", "sweep_job": "LLMSTAGES_SWEEP_JOB"}
        self.tags.update({k: os.environ[v] for k, v in env_tags.items() if os.environ.get(v)})
        key = config_hash(cfg, *inputs)
        if "sweep" in self.tags:  # a sweep job resumes only itself, never another run of the same config
            key = hashlib.sha256(f"{key}:{self.tags['sweep']}:{self.tags.get('sweep_job')}".encode()).hexdigest()[:12]
        self.ckpt_dir = Path("outputs/checkpoints") / f"{name}-{key}"
        run_name = f"{name}-{self.pipeline_run}" if "sweep" not in self.tags else \
            f"{name}-{Path(self.tags['sweep']).name}-job{self.tags.get('sweep_job', '')}"
        lc = cfg.logger
        uri = project_path(lc.mlflow_tracking_uri) if "mlflow" in lc.backends else None
        lineage, self.lineage = lineage_tags(inputs, uri) if self.rank_zero else ({}, {})
        self.tags.update(lineage)
        # A rerun after an interruption (its resume checkpoint is there) continues the same tracking runs.
        ids_file = self.ckpt_dir / "tracking.json"
        resume = json.loads(ids_file.read_text()) if (self.ckpt_dir / "last.ckpt").is_file() and ids_file.is_file() \
            else None
        parent = ("pipeline_run", self.pipeline_run) if in_pipeline() else \
            ("sweep", self.tags["sweep"]) if "sweep" in self.tags else None
        self.loggers = make_loggers(list(lc.backends), stage=name, run_name=run_name, tags=self.tags,
                                    experiment=lc.experiment, mlflow_tracking_uri=lc.mlflow_tracking_uri,
                                    mlflow_artifact_location=lc.mlflow_artifact_location,
                                    wandb_project=lc.wandb_project, wandb_mode=lc.wandb_mode,
                                    wandb_dir=lc.wandb_dir, csv_dir=lc.csv_dir, parent=parent,
                                    resume=resume, description=self.description(inputs)) if self.rank_zero else []
        if self.loggers and not resume:  # the data files the stage reads (the data stage: the corpus)
            md5s = self.lineage.get("inputs", {})
            reads = {f: h for f, h in md5s.items() if Path(f).name in DATA_FILES.get(name, ())
                     and Path(f).parent == Path(inputs[0])} if name != "data" else md5s
            if len(reads) <= 20:  # a corpus of many files is in lineage.json, not one dataset per file
                log_datasets(self.loggers, reads)
        if self.loggers:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(ids_file, run_ids(self.loggers))
            for line in where_tracked(self.loggers):
                log.info("%s: tracked as %s", name, line)
        every = lc.get("system_metrics_every_s", 0)
        self.monitors = start_system_metrics(self.loggers, every) if every and every > 0 else []
        flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
        # The precision the Trainer gets ("auto" resolved for this machine), in the log, meta.json and the trackers.
        self.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator) if "trainer" in cfg else None
        if self.precision:
            flat["trainer.precision_used"] = self.precision
        if self.precision and self.rank_zero:
            log.info("%s: training in %s (trainer.precision=%s)", name, self.precision, cfg.trainer.precision)
        for lg in self.loggers:
            lg.log_hyperparams(flat)
        log_lineage(self.loggers, self.tags)
        self.started = time.time()
        self.clock = StageClock()
        _OPEN.append(self)

    def description(self, inputs: list[str | Path]) -> str:
        """The tracking run's description: what the stage does, from what, in which pipeline run."""
        what = DESCRIPTIONS[self.name].format(algorithm=self.cfg.get("algorithm", ""))
        where = f"DVC experiment {self.tags['dvc_exp_name']}" if self.tags.get("dvc_exp_name") else \
            f"pipeline run {self.pipeline_run}"
        reads = f"Inputs: {', '.join(map(str, inputs))}; " if inputs else ""
        return f"{self.name}: {what}. {reads}Output: {self.out_dir}; {where}."

    def trainer(self, callbacks: list | None = None, **overrides) -> L.Trainer:
        """A Lightning Trainer from ``cfg.trainer`` that writes resumable checkpoints to ``ckpt_dir``.

        Training loaders are made per process by the stage (each reads its share of one resumable order, e.g.
        :func:`~llmstages.data.datasets.shuffled_loader`), so Lightning does not replace their samplers
        (``use_distributed_sampler=False``); under DDP every process scores the whole validation set.

        Besides the tracking loggers, every metric the stage logs goes to ``out_dir/curves/`` as DVC plot files
        (:func:`~llmstages.tracking.curve_logger`; continued when the run resumes from its checkpoint).

        The trainer settings were checked before (:func:`~llmstages.runtime.check_trainer`).
        """
        from lightning.pytorch.callbacks import ModelCheckpoint

        from ..tracking import curve_logger

        t = self.cfg.trainer
        ckpt = ModelCheckpoint(dirpath=self.ckpt_dir, save_last=True, save_top_k=0,
                               every_n_train_steps=t.checkpoint_every_n_steps)
        cbs = [ckpt, *(callbacks or []), LearningRate(), self.clock]
        resuming = (self.ckpt_dir / "last.ckpt").is_file()
        curves = curve_logger(self.ckpt_dir / "curves", self.out_dir, resume=resuming)
        if resuming and self.rank_zero:  # the steps after the checkpoint were logged before the interruption
            skip_logged_steps([*self.loggers, curves], self.ckpt_dir / "curves")
        if t.enable_progress_bar:
            cbs.append(StepProgressBar(self.name))
        kwargs = dict(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
                      precision=self.precision, max_steps=t.max_steps, max_epochs=-1,
                      val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                      limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
                      accumulate_grad_batches=t.accumulate_grad_batches, enable_progress_bar=t.enable_progress_bar,
                      gradient_clip_val=self.cfg.optim.grad_clip or None, logger=[*self.loggers, curves],
                      callbacks=cbs, enable_model_summary=False, num_sanity_val_steps=0,
                      use_distributed_sampler=False, deterministic=t.deterministic,
                      default_root_dir=str(self.ckpt_dir))
        kwargs.update(overrides)
        return L.Trainer(**kwargs)

    def fit(self, trainer: L.Trainer, module: L.LightningModule, train_dl, val_dl=None) -> int:
        """Fit, resuming from ``ckpt_dir/last.ckpt`` when a previous run of the same config was interrupted.

        Returns the global step the run resumed from (0 for a fresh start).
        """
        last = self.ckpt_dir / "last.ckpt"
        resumed = 0
        if last.is_file():
            resumed = int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", 0))
        if last.is_file() and self.rank_zero:
            log.warning("%s: resuming from %s (step %d)", self.name, last, resumed)
        if not module.automatic_optimization:
            at_optimizer_steps(trainer)
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if last.is_file() else None)
        return resumed

    def finish(self, metrics: dict, artifacts: list[Path] | None = None) -> dict:
        """Write ``metrics.json`` and the config used to ``out_dir``, log them, and drop the resume checkpoints."""
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        metrics["wall_seconds"] = round(time.time() - self.started, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        write_json(self.out_dir / "metrics.json", metrics)
        outputs = tree_md5s([self.out_dir])
        output_md5 = combined_md5(outputs, self.out_dir)  # what a downstream stage finds as its input
        stop_system_metrics(self.monitors)
        tag_output(self.loggers, output_md5)
        if self.name != "data":
            log_model(self.loggers, self.name, self.out_dir, output_md5,
                      register_as="llmstages-policy" if self.name == "rlhf" else None)
        with tempfile.TemporaryDirectory() as tmp:  # lineage.json: an artifact, not a file of the stage output
            lineage = Path(tmp) / "lineage.json"
            write_json(lineage, {**self.lineage, "tags": self.tags, "outputs": outputs, "output_md5": output_md5})
            files = [self.out_dir / "metrics.json", self.out_dir / "config.yaml", lineage, *(artifacts or [])]
            log_summary(self.loggers, metrics, files, stage=self.name)
        if self in _OPEN:
            _OPEN.remove(self)
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.log_time_split()
        return metrics

    def log_time_split(self) -> None:
        """Log the process's wall time so far split into start-up (process start to the first training step:
        imports, config, data, models, evaluation before training), training, and after it (evaluation, saving,
        tracking)."""
        clock, now = self.clock, time.time()
        if clock.first_batch_at is None or clock.train_end_at is None:
            return  # no training in this process (the data stage, or a run that had nothing left to train)
        start = now - process_age_s()
        log.info("%s: %.1f s since the process started: start-up %.1f s, training %.1f s, after training %.1f s",
                 self.name, now - start, clock.first_batch_at - start, clock.train_end_at - clock.first_batch_at,
                 now - clock.train_end_at)

    def log_probes(self, prompts: list[str], responses: list[str], rewards: list[float] | None = None) -> None:
        """Log the probe prompts' answers (and reward-model scores) as a table: MLflow artifact ``probes.json``
        (compare it across runs in the UI's artifact view), W&B table ``probes``, and one log line each."""
        rows = [{"prompt": p, "response": r, **({"reward": round(rewards[i], 4)} if rewards else {})}
                for i, (p, r) in enumerate(zip(prompts, responses))]
        for row in rows:
            log.info("%s probe: %s", self.name, " | ".join(f"{k}={v!r}" for k, v in row.items()))
        log_table(self.loggers, "probes", rows)

    def meta(self, **extra) -> dict:
        """The ``meta.json`` of a stage output: stage, pipeline run, commit, the precision it trained in, and
        stage-specific fields."""
        return {"stage": self.name, **self.tags, **({"precision": self.precision} if self.precision else {}), **extra}

def at_optimizer_steps(trainer: L.Trainer) -> None:
    """Make ``trainer``'s loggers put every point on the optimizer-step axis, as the other stages' points are.

    Lightning steps the loggers of a manual-optimization module (PPO, GRPO, online DPO: an iteration of several
    optimizer steps per batch) by batch; here a point logged during training lands at the iteration's last
    optimizer step (``global_step - 1``, 0-based, as automatic optimization logs step k's loss at k), the
    learning rate included, so ``dvc plots``, MLflow and ``llmstages compare`` draw every stage on one axis.
    Points logged without a step (the final summary) are left as they are."""
    for lg in trainer.loggers:
        def on_step_axis(metrics: dict, step: int | None = None, _log=lg.log_metrics) -> None:
            _log(metrics, step if step is None else max(trainer.global_step - 1, 0))
        lg.log_metrics = on_step_axis


def _flatten(d: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested config; an empty list or mapping as its text (``"[]"``), which Lightning's
    loggers would otherwise drop, so that a run with ``data.corpus=[]`` still shows the key that differs."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v) if isinstance(v, (list, dict)) and not v else v
    return out
