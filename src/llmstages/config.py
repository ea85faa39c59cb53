"""Typed config schemas for every stage, and their validation.

The YAML under ``conf/`` is composed by Hydra (by the CLI, or by DVC into ``params.yaml``); each stage's
section is then merged onto its dataclass schema here, so a misspelled key or a wrong type stops the run
before any work with a message naming the key. (The schemas are not put in Hydra's ConfigStore on purpose:
DVC composes ``params.yaml`` without importing this package, so ``conf/`` must compose from YAML alone.)
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import STAGES  # noqa: F401  (part of this module's API)
from .data.corpus import FORMATS as CORPUS_FORMATS  # data.data.corpus_format
from .data.datasets import LONG_PROMPT_POLICIES
from .lora import LoRA, check_lora
from .losses import KL_ESTIMATORS
from .model import GPTConfig
from .runtime import check_trainer
from .tracking import BACKENDS

#: PPO/GRPO sequence rewards (:func:`llmstages.rollout.sequence_reward_fn`).
REWARDS = ("model", "exact_match", "model+exact_match", "verifiable_or_model")
ALGORITHMS = ("ppo", "dpo", "grpo")  # rlhf.algorithm
VALUE_MODELS = ("reward_model", "policy_head")  # rlhf.ppo.value_model
DPO_PAIRS = ("offline", "online")  # rlhf.dpo.pairs
DIRECTIONS = ("minimize", "maximize")  # objective.direction


def updates_per_iteration(algorithm: str, c) -> int:
    """Optimizer steps in one iteration (one rollout) of ``algorithm`` (ppo, grpo or online dpo) with its config
    section ``c``: passes over the iteration's samples x minibatches per pass (the last may be smaller)."""
    passes, samples = {"ppo": lambda: (c.ppo_epochs, c.rollout_batch_size),
                       "grpo": lambda: (c.epochs, c.prompts_per_step * c.group_size),
                       "dpo": lambda: (c.epochs, c.prompts_per_step)}[algorithm]()
    return passes * -(-samples // c.minibatch_size)


def _every_field_given(cls: type) -> type:
    """``cls`` (a dataclass of the code, with its own defaults) as a schema whose every field the config must give."""
    hints = typing.get_type_hints(cls)
    return make_dataclass(f"{cls.__name__}Schema", [(f.name, hints[f.name], field(default=MISSING)) for f in fields(cls)])


ModelSchema = _every_field_given(GPTConfig)  # the model section is the architecture itself (conf/model/)
LoRASchema = _every_field_given(LoRA)  # conf/lora/


@dataclass
class OptimSchema:
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    grad_clip: float = MISSING


@dataclass
class TrainerSchema:
    accelerator: str = MISSING
    devices: Any = MISSING
    strategy: str = MISSING
    num_nodes: int = MISSING
    precision: str = MISSING
    max_steps: int = MISSING
    val_check_interval: int = MISSING
    limit_val_batches: int = MISSING
    log_every_n_steps: int = MISSING
    accumulate_grad_batches: int = MISSING
    checkpoint_every_n_steps: int = MISSING
    enable_progress_bar: bool = MISSING
    compile: bool = MISSING  # torch.compile the training forward (pretrain, sft, reward); eager fallback on failure
    seed: int = MISSING
    deterministic: Any = MISSING  # false | true | warn: Lightning's Trainer(deterministic=...)


@dataclass
class LoggerSchema:
    backends: list[str] = MISSING  # any of mlflow, wandb, csv
    experiment: str = MISSING
    mlflow_tracking_uri: str = MISSING
    mlflow_artifact_location: str = MISSING
    wandb_project: str = MISSING
    wandb_mode: Optional[str] = MISSING  # None: online if WANDB_API_KEY is set, else offline
    wandb_dir: str = MISSING
    csv_dir: str = MISSING
    system_metrics_every_s: float = MISSING  # MLflow's CPU/memory/GPU sampling interval; 0 = off


@dataclass
class ProbesSchema:
    """Fixed prompts each training stage answers (greedy) at the end and logs as a table (conf/probes/)."""

    prompts: list[str] = MISSING
    max_new_tokens: int = MISSING


@dataclass
class ObjectiveSchema:
    """What a Hydra sweep of the stage optimises: a key of its metrics.json, and whether lower or higher is better."""

    metric: str = MISSING
    direction: str = MISSING  # minimize | maximize


@dataclass
class TokenizerSchema:
    path: Optional[str] = MISSING  # a local Hugging Face tokenizer.json or folder; None = train byte-level BPE
    bos_token: Optional[str] = MISSING  # None: from tokenizer_config.json, else <|bos|> (added)
    eos_token: Optional[str] = MISSING  # None: from tokenizer_config.json, else a well-known EOS name
    pad_token: Optional[str] = MISSING  # None: from tokenizer_config.json, else the EOS


@dataclass
class RowSetSchema:
    """A user SFT or preference file and how to read it (see llmstages.data.formats)."""

    path: Optional[str] = MISSING  # None = the built-in set
    format: str = MISSING
    columns: Optional[dict[str, str]] = MISSING  # canonical field -> the file column name
    system_prompt: Optional[str] = MISSING
    on_bad_row: str = MISSING  # error (stop at the first) | skip (drop it, counted as "malformed")


@dataclass
class DataSourceSchema:
    corpus: list[str] = MISSING  # files, folders or globs; empty = the stdlib corpus
    corpus_format: str = MISSING  # auto | text | jsonl | parquet | hf
    text_column: str = MISSING
    hf_split: str = MISSING
    max_corpus_mb: Optional[float] = MISSING  # None = no cap
    max_doc_mb: Optional[float] = MISSING  # None = one text file, one document
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    sft: RowSetSchema = field(default_factory=RowSetSchema)
    preference: RowSetSchema = field(default_factory=RowSetSchema)


@dataclass
class DataStageSchema:
    data: DataSourceSchema = field(default_factory=DataSourceSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    out_dir: str = MISSING
    vocab_size: int = MISSING
    tokenizer_sample_mb: float = MISSING
    val_fraction: float = MISSING
    arithmetic_max: int = MISSING
    heldout_fraction: float = MISSING
    arithmetic_corpus_passes: int = MISSING
    seed: int = MISSING
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)


@dataclass
class TrainStageSchema:
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    probes: ProbesSchema = field(default_factory=ProbesSchema)
    data_dir: str = MISSING
    out_dir: Optional[str] = MISSING  # None: outputs/<stage> in the pipeline, Hydra's run folder for ad-hoc runs
    batch_size: int = MISSING
    num_workers: int = MISSING
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)


@dataclass
class PretrainSchema(TrainStageSchema):
    model: ModelSchema = field(default_factory=ModelSchema)
    seq_len: int = MISSING


@dataclass
class FineTuneSchema(TrainStageSchema):  # sft and reward: a model loaded from init_from, trained on chat rows
    init_from: str = MISSING
    lora: LoRASchema = field(default_factory=LoRASchema)
    max_len: int = MISSING
    long_prompt: str = MISSING  # truncate_left | drop
    padding_free: bool = MISSING


@dataclass
class SFTSchema(FineTuneSchema):
    packing: bool = MISSING
    eval_max_new_tokens: int = MISSING
    eval_limit: int = MISSING
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)


@dataclass
class RewardSchema(FineTuneSchema):
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)


@dataclass
class RolloutSchema:
    """What PPO, GRPO and online DPO share: how responses are sampled and rewarded, and the learning rate that
    ``optim.lr`` takes by default when this algorithm runs (``conf/stage/rlhf.yaml``)."""

    lr: float = MISSING
    minibatch_size: int = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    reward: str = MISSING  # model | exact_match | model+exact_match | verifiable_or_model
    exact_match_weight: float = MISSING
    verifiable_tasks: list[str] = MISSING  # for verifiable_or_model
    missing_eos_penalty: float = MISSING


@dataclass
class PPOSchema(RolloutSchema):
    rollout_batch_size: int = MISSING
    clip_range: float = MISSING
    ppo_epochs: int = MISSING
    kl_coef: float = MISSING
    kl_estimator: str = MISSING
    kl_target: Optional[float] = MISSING  # None: fixed kl_coef; else adaptive (Ziegler et al. 2019)
    kl_horizon: int = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    value_clip_range: float = MISSING
    vf_coef: float = MISSING
    value_model: str = MISSING  # reward_model (separate critic initialised from it) | policy_head
    whiten_advantages: bool = MISSING
    reward_norm: bool = MISSING
    reward_clip: float = MISSING  # 0 = off


@dataclass
class DPOSchema(RolloutSchema):
    pairs: str = MISSING  # offline (the data stage's preference pairs) | online (sampled, ranked by the reward)
    beta: float = MISSING
    label_smoothing: float = MISSING
    sft_coef: float = MISSING  # RPO: weight of the chosen responses' NLL
    batch_size: int = MISSING  # offline: pairs per optimizer step
    max_len: int = MISSING
    long_prompt: str = MISSING
    prompts_per_step: int = MISSING  # online: prompts sampled per iteration, one pair each
    samples_per_prompt: int = MISSING
    minibatch_size: int = MISSING  # online: pairs per optimizer step
    epochs: int = MISSING


@dataclass
class GRPOSchema(RolloutSchema):
    prompts_per_step: int = MISSING
    clip_range: float = MISSING
    group_size: int = MISSING
    epochs: int = MISSING
    kl_coef: float = MISSING


@dataclass
class RLHFSchema:
    algorithm: str = MISSING  # ppo | dpo | grpo: which of the sections below is used
    ppo: PPOSchema = field(default_factory=PPOSchema)
    dpo: DPOSchema = field(default_factory=DPOSchema)
    grpo: GRPOSchema = field(default_factory=GRPOSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    probes: ProbesSchema = field(default_factory=ProbesSchema)
    lora: LoRASchema = field(default_factory=LoRASchema)
    data_dir: str = MISSING
    policy_from: str = MISSING
    reward_from: str = MISSING
    out_dir: Optional[str] = MISSING
    eval_limit: int = MISSING
    eval_max_new_tokens: int = MISSING
    num_workers: int = MISSING
    balance_tasks: bool = MISSING
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)


SCHEMAS: dict[str, type] = {"data": DataStageSchema, "pretrain": PretrainSchema, "sft": SFTSchema,
                             "reward": RewardSchema, "rlhf": RLHFSchema}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key."""


def closest(name: str, known, cutoff: float = 0.6) -> str | None:
    """The name in ``known`` closest to a misspelt ``name`` (difflib's ratio at least ``cutoff``), or None."""
    import difflib

    match = difflib.get_close_matches(name, sorted(str(k) for k in known), n=1, cutoff=cutoff)
    return match[0] if match else None


def _unknown_key(stage: str, key: str) -> tuple[DictConfig, str, str, str] | None:
    """Where dotted ``key`` leaves ``stage``'s schema: ``(node, known, part, rest)`` for the first part of the key
    that ``node`` (the schema node at the ``known`` path, "" for the root) lacks, with ``rest`` the parts after it;
    None for a known key, or one under a value that is not a schema node."""
    node: object = OmegaConf.structured(SCHEMAS[stage])
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part not in node.keys():  # `part in node` would be False for a known key without a value
            return node, ".".join(parts[:i]), part, ".".join(parts[i + 1:])
        node = OmegaConf.select(node, part, default=None)
    return None


def _shallowest_first(paths) -> list[str]:
    """Dotted schema paths, shallowest first, and a shared section's before an RL algorithm's (optim.lr, ppo.lr)."""
    return sorted(paths, key=lambda p: (p.count("."), p.partition(".")[0] in ALGORITHMS))


def _suggest(stage: str, key: str) -> str | None:
    """The key of ``stage``'s schema that a misspelled dotted ``key`` most likely means, or None. A key whose first
    part names a setting deeper in the schema (``lr``, ``sft.path``) is answered with its full path."""
    found = _unknown_key(stage, key)
    if found is None:
        return None
    node, known, part, rest = found
    tail = f".{rest}" if rest else ""
    # candidates for the unknown part: at its place, or (at the root) anywhere deeper; the rest must fit under one
    paths = _shallowest_first(p for p in (_leaf_paths(node) if not known else [str(k) for k in node.keys()])
                              if not rest or _has(OmegaConf.select(node, p, default=None), rest))
    match = closest(part, {p.rpartition(".")[2] for p in paths})
    path = next((p for p in paths if p.rpartition(".")[2] == match), None)
    if path is None and known:  # nothing close at its place: the key may belong elsewhere (data.data.val_fraction)
        if _has(OmegaConf.structured(SCHEMAS[stage]), part + tail):
            return part + tail
        return _suggest(stage, part + tail)
    return f"{known + '.' if known else ''}{path}{tail}" if path else None


def _did_you_mean(stage: str, key: str, prefix: str = "") -> str:
    """``"; did you mean 'optim.lr'?"`` for a misspelled ``key`` of ``stage``'s schema (:func:`_suggest`), with
    ``prefix`` before it, else ``""``."""
    path = _suggest(stage, key)
    return f"; did you mean '{prefix}{path}'?" if path else ""


def stage_keys(key: str, stages: Iterable[str] = STAGES) -> list[str]:
    """The params.yaml keys (``<stage>.<path>``) that dotted ``key``, given without a stage's section, may mean:
    in each stage, the key itself or the shallowest path ending in it (``lr`` -> ``pretrain.optim.lr``, ...,
    ``rlhf.optim.lr``); where no stage has one, the closest misspelling per stage (:func:`_suggest`)."""
    exact, close = [], []
    for stage in stages:
        paths = _shallowest_first(p for p in _leaf_paths(OmegaConf.structured(SCHEMAS[stage]))
                                  if p == key or p.endswith("." + key))
        if paths:
            exact.append(f"{stage}.{paths[0]}")
        elif path := _suggest(stage, key):
            close.append(f"{stage}.{path}")
    return exact or close


def _has(node: object, key: str) -> bool:
    """Whether schema ``node`` has dotted ``key`` (with or without a value)."""
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = OmegaConf.select(node, part, default=None)
    return True


def _leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted path of ``node``'s tree, breadth first (``optim`` before ``optim.lr``)."""
    level, deeper = [], []
    for k in node.keys():
        path = f"{prefix}{k}"
        level.append(path)
        child = OmegaConf.select(node, str(k), default=None)
        if isinstance(child, DictConfig):
            deeper.append((child, path + "."))
    return level + [p for child, pre in deeper for p in _leaf_paths(child, pre)]


def unknown_override(stage: str, override: str, groups: Iterable[str] = (), prefix: str = "") -> str | None:
    """The error for a command-line ``key=value`` whose key is not in ``stage``'s config (a misspelling Hydra would
    only answer with "append with +key"), e.g. ``"no key 'trainer.max_stepz' in the sft config; did you mean
    'trainer.max_steps'?"`` or ``"no key 'lr' in the sft config; did you mean 'optim.lr'?"``; None for a known key,
    a ``+``/``~`` override, a config group (one of ``groups``, the folders of ``conf/``, or a ``group/sub`` path), or
    a key outside the schema (Hydra's ``hydra.*``). ``prefix`` goes before the keys named (``"data."`` for an
    override of params.yaml's ``data`` section)."""
    key, sep, _ = override.partition("=")
    if not sep or key[:1] in "+~" or "/" in key or key == "hydra" or key.startswith("hydra.") or key in groups \
            or _unknown_key(stage, key) is None:
        return None
    return f"no key '{prefix}{key}' in the {stage} config{_did_you_mean(stage, key, prefix)}"


def validate(stage: str, cfg: DictConfig | dict, source: str = "config", runs_here: bool = False) -> DictConfig:
    """Merge ``cfg`` onto the stage schema: unknown keys and wrong types raise :class:`ConfigError`.

    Every value comes from the config (the schemas hold types, not defaults: a key without a value raises).
    Hydra's own ``hydra`` node, if present, is ignored. ``runs_here``: the stage is about to run in this process,
    so the trainer settings are checked against this machine too (:func:`~llmstages.runtime.check_trainer`).
    Returns a read-only typed config.
    """
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    if stage == "rlhf" and cfg.get("algorithm") not in (*ALGORITHMS, None, "???"):  # before optim.lr (null for it)
        raise ConfigError(f"{source}: rlhf.algorithm: unknown algorithm {cfg.get('algorithm')!r}; expected one of "
                          f"{', '.join(ALGORITHMS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[stage]), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", err)).strip().splitlines()[0]  # OmegaConf appends full_key/object_type lines
        raise ConfigError(f"{source}: invalid {stage} config at key '{key}': {msg}{_did_you_mean(stage, key)}") from err
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:  # the schemas hold no defaults: conf/ gives every value (params.yaml from an older conf/ may not)
        raise ConfigError(f"{source}: {stage} config has no value for {', '.join(missing)} (every key comes from "
                          "conf/; recompose params.yaml with: llmstages params)")
    _check_values(stage, merged, source, runs_here)
    OmegaConf.set_readonly(merged, True)
    return merged


def _check_values(stage: str, cfg: DictConfig, source: str, runs_here: bool) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {stage}.{key}: {msg}")

    if "optim" in cfg and cfg.optim.lr <= 0:  # rlhf: name <algorithm>.lr when optim.lr took its value from there
        own = stage == "rlhf" and cfg[cfg.algorithm].lr == cfg.optim.lr
        bad(f"{cfg.algorithm}.lr" if own else "optim.lr", f"must be > 0, got {cfg.optim.lr}"
            + (" (optim.lr takes it)" if own else ""))
    if "optim" in cfg and cfg.optim.warmup_steps < 0:
        bad("optim.warmup_steps", f"must be >= 0, got {cfg.optim.warmup_steps}")
    if "optim" in cfg and not 0 <= cfg.optim.min_lr_ratio <= 1:
        bad("optim.min_lr_ratio", f"must be in [0, 1] (the final learning rate over optim.lr), got "
                                  f"{cfg.optim.min_lr_ratio}")
    if "trainer" in cfg:
        offline_dpo = stage == "rlhf" and cfg.algorithm == "dpo" and cfg.dpo.pairs == "offline"
        manual = f"rlhf.algorithm={cfg.algorithm}" if stage == "rlhf" and not offline_dpo else ""
        for key, msg in check_trainer(cfg.trainer, runs_here, manual):
            bad(f"trainer.{key}", msg)
    if cfg.objective.direction not in DIRECTIONS:
        bad("objective.direction", f"expected minimize or maximize, got {cfg.objective.direction!r}")
    if not cfg.objective.metric:
        bad("objective.metric", "is empty: name a key of the stage's metrics.json (e.g. val_loss)")
    if "probes" in cfg and cfg.probes.max_new_tokens < 1:
        bad("probes.max_new_tokens", f"expected at least 1, got {cfg.probes.max_new_tokens} "
            "(to skip the probes, set probes.prompts=[])")
    for key, msg in check_lora(cfg.lora, runs_here) if "lora" in cfg else []:
        bad(key, msg)
    for key in ("batch_size", "max_len", "seq_len"):
        if key in cfg and cfg[key] <= 0:
            bad(key, f"must be > 0, got {cfg[key]}")
    if "num_workers" in cfg and cfg.num_workers < 0:
        bad("num_workers", f"must be >= 0 (0 = load in the training process), got {cfg.num_workers}")
    if "model" in cfg:  # the architecture's own checks (GPTConfig), before the stage reads any data
        from .model import GPTConfig

        try:
            GPTConfig(**OmegaConf.to_container(cfg.model))
        except ValueError as err:
            raise ConfigError(f"{source}: {stage}.{err}") from None
        if "seq_len" in cfg and cfg.seq_len > cfg.model.max_seq_len:
            bad("seq_len", f"must be at most model.max_seq_len={cfg.model.max_seq_len}, got {cfg.seq_len}")
    if "logger" in cfg:
        for b in cfg.logger.backends:
            if b not in BACKENDS:
                bad("logger.backends", f"unknown backend {b!r}; expected one of {', '.join(BACKENDS)}")
        uri = str(cfg.logger.mlflow_tracking_uri or "")
        if "mlflow" in cfg.logger.backends and not uri.strip():  # MLflow would make ./mlflow.db
            bad("logger.mlflow_tracking_uri", f"expected a tracking URI such as sqlite:///outputs/mlflow.db, got "
                                              f"{uri!r}")
    if stage == "sft":  # rlhf checks the same keys below, among its own
        if cfg.eval_max_new_tokens <= 0:
            bad("eval_max_new_tokens", f"must be > 0, got {cfg.eval_max_new_tokens}")
        if cfg.eval_limit < 0:
            bad("eval_limit", f"must be >= 0 (0 = every held-out question and pair), got {cfg.eval_limit}")
    if stage == "rlhf":
        own = {"ppo": "rollout_batch_size ppo_epochs", "grpo": "prompts_per_step epochs",
               "dpo": "batch_size max_len prompts_per_step epochs"}  # + the sampling keys and lr they share
        for key in [f"{a}.{k}" for a, keys in own.items() for k in f"{keys} minibatch_size max_new_tokens temperature "
                    "top_p lr".split()] + ["eval_max_new_tokens"]:
            if OmegaConf.select(cfg, key) <= 0:
                bad(key, f"must be > 0, got {OmegaConf.select(cfg, key)}")
        for key in ("ppo.kl_coef", "grpo.kl_coef", "eval_limit", "ppo.top_k", "grpo.top_k", "dpo.top_k",
                    "ppo.reward_clip"):
            if OmegaConf.select(cfg, key) < 0:
                bad(key, f"must be >= 0, got {OmegaConf.select(cfg, key)}")
        for key in ("ppo.top_p", "grpo.top_p", "dpo.top_p"):
            if not 0 < OmegaConf.select(cfg, key) <= 1:
                bad(key, f"must be in (0, 1] (the nucleus mass; 1 = off), got {OmegaConf.select(cfg, key)}")
        for key in ("ppo.gamma", "ppo.lam"):
            if not 0 <= OmegaConf.select(cfg, key) <= 1:
                bad(key, f"must be in [0, 1], got {OmegaConf.select(cfg, key)}")
        for key in ("ppo.clip_range", "grpo.clip_range", "ppo.value_clip_range"):
            if OmegaConf.select(cfg, key) <= 0:
                bad(key, f"must be > 0 (the PPO clip range epsilon), got {OmegaConf.select(cfg, key)}")
        if cfg.ppo.vf_coef < 0:
            bad("ppo.vf_coef", f"must be >= 0, got {cfg.ppo.vf_coef}")
        if cfg.dpo.beta <= 0:
            bad("dpo.beta", f"must be > 0, got {cfg.dpo.beta}")
        if not 0 <= cfg.dpo.label_smoothing < 0.5:
            bad("dpo.label_smoothing", f"must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
        for algo in ("ppo", "grpo", "dpo"):
            if cfg[algo].reward not in REWARDS:
                bad(f"{algo}.reward", f"expected one of {', '.join(REWARDS)}, got {cfg[algo].reward!r}")
        if cfg.ppo.value_model not in VALUE_MODELS:
            bad("ppo.value_model", f"expected one of {', '.join(VALUE_MODELS)}, got {cfg.ppo.value_model!r}")
        if cfg.ppo.kl_estimator not in KL_ESTIMATORS:
            bad("ppo.kl_estimator", f"expected one of {', '.join(KL_ESTIMATORS)}, got {cfg.ppo.kl_estimator!r}")
        if cfg.ppo.rollout_batch_size % cfg.ppo.minibatch_size:
            bad("ppo.minibatch_size", "must divide ppo.rollout_batch_size")
        if cfg.ppo.kl_target is not None and cfg.ppo.kl_target <= 0:
            bad("ppo.kl_target", f"must be > 0 (or null for a fixed kl_coef), got {cfg.ppo.kl_target}")
        if cfg.grpo.group_size < 2:
            bad("grpo.group_size", f"must be >= 2 (advantages are relative to the group), got {cfg.grpo.group_size}")
        if (cfg.grpo.prompts_per_step * cfg.grpo.group_size) % cfg.grpo.minibatch_size:
            bad("grpo.minibatch_size", "must divide grpo.prompts_per_step * grpo.group_size")
        if cfg.dpo.pairs not in DPO_PAIRS:
            bad("dpo.pairs", f"expected one of {', '.join(DPO_PAIRS)}, got {cfg.dpo.pairs!r}")
        if cfg.dpo.samples_per_prompt < 2:
            bad("dpo.samples_per_prompt", f"must be >= 2 (a pair is two of them), got {cfg.dpo.samples_per_prompt}")
        if cfg.dpo.prompts_per_step % cfg.dpo.minibatch_size:
            bad("dpo.minibatch_size", "must divide dpo.prompts_per_step (one pair per prompt)")
        online_dpo = cfg.algorithm == "dpo" and cfg.dpo.pairs == "online"
        if cfg.algorithm in ("ppo", "grpo") or online_dpo:  # one training step (an iteration): several optimizer steps
            per_iter = updates_per_iteration(cfg.algorithm, cfg[cfg.algorithm])
            if cfg.trainer.max_steps % per_iter:
                bad("trainer.max_steps", f"counts optimizer steps, {per_iter} per {cfg.algorithm} iteration: use a "
                                         f"multiple of {per_iter}, got {cfg.trainer.max_steps}")
    for key in ("long_prompt", "dpo.long_prompt"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in LONG_PROMPT_POLICIES:
            bad(key, f"expected one of {', '.join(LONG_PROMPT_POLICIES)}, got {value!r}")
    if stage == "data":
        from .data.formats import PREFERENCE_FORMATS, SFT_FORMATS

        d = cfg.data
        if not d.tokenizer.path and not 262 <= cfg.vocab_size <= 1 << 20:  # 6 specials + 256 bytes, uint32 ids
            bad("vocab_size", f"must be in 262..{1 << 20}, got {cfg.vocab_size}")
        if not 0 < cfg.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
        if d.corpus_format != "auto" and not d.corpus:
            bad("data.corpus", f"is empty (the stdlib corpus) but data.corpus_format={d.corpus_format}: give the "
                               "files, folders or datasets to read")
        if d.corpus_format not in CORPUS_FORMATS:
            bad("data.corpus_format", f"expected one of {', '.join(CORPUS_FORMATS)}, got {d.corpus_format!r}")
        if d.max_corpus_mb is not None and d.max_corpus_mb <= 0:
            bad("data.max_corpus_mb", f"must be > 0 (or null for no cap), got {d.max_corpus_mb}")
        if d.max_doc_mb is not None and not d.max_doc_mb * 1e6 >= 1:
            bad("data.max_doc_mb", f"must be at least 1e-6 (one byte), or null: one document per text file, got "
                                   f"{d.max_doc_mb}")
        for key, formats in (("sft", SFT_FORMATS), ("preference", PREFERENCE_FORMATS)):
            if d[key].on_bad_row not in ("error", "skip"):
                bad(f"data.{key}.on_bad_row", f"expected error or skip, got {d[key].on_bad_row!r}")
            if d[key].format not in formats:
                bad(f"data.{key}.format", f"expected one of {', '.join(formats)}, got {d[key].format!r}")
