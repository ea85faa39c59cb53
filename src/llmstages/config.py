"""Typed config schemas for every stage, and their validation.

The YAML under ``conf/`` is composed by Hydra (by the CLI, or by DVC into ``params.yaml``); each stage's
section is then merged onto its dataclass schema here, so a misspelled key or a wrong type stops the run
before any work with a message naming the key. (The schemas are not put in Hydra's ConfigStore on purpose:
DVC composes ``params.yaml`` without importing this package, so ``conf/`` must compose from YAML alone.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .model import GPTConfig as ModelSchema  # the model section is the architecture itself

STAGES = ("data", "pretrain", "sft", "reward", "rlhf")
#: PPO/GRPO sequence rewards (:func:`llmstages.rollout.sequence_reward_fn`).
REWARDS = ("model", "exact_match", "model+exact_match", "verifiable_or_model")
ALGORITHMS = ("ppo", "dpo", "grpo")  # rlhf.algorithm
CORPUS_FORMATS = ("auto", "text", "jsonl", "parquet", "hf")  # data.data.corpus_format
DIRECTIONS = ("minimize", "maximize")  # objective.direction
# trainer.precision: "auto" (resolve_precision) and the values Lightning's Trainer accepts
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")


@dataclass
class OptimSchema:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainerSchema:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    max_steps: int = 1000
    val_check_interval: int = 200
    limit_val_batches: int = 10
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    checkpoint_every_n_steps: int = 100
    enable_progress_bar: bool = True
    compile: bool = False  # torch.compile the training forward (pretrain, sft, reward); eager fallback on failure
    seed: int = 1234


@dataclass
class LoggerSchema:
    backends: list[str] = field(default_factory=lambda: ["mlflow"])  # any of mlflow, wandb, csv
    experiment: str = "llmstages"
    mlflow_tracking_uri: str = "sqlite:///outputs/mlflow.db"
    mlflow_artifact_location: str = "outputs/mlartifacts"
    wandb_project: str = "llmstages"
    wandb_mode: Optional[str] = None  # None: online if WANDB_API_KEY is set, else offline
    wandb_dir: str = "outputs"
    csv_dir: str = "outputs/csv"


@dataclass
class ProbesSchema:
    """Fixed prompts each training stage answers (greedy) at the end and logs as a table (conf/probes/)."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32


@dataclass
class ObjectiveSchema:
    """What a Hydra sweep of the stage optimises: a key of its metrics.json, and whether lower or higher is better."""

    metric: str = "val_loss"
    direction: str = "minimize"  # minimize | maximize


def _objective(metric: str, direction: str) -> Any:
    return field(default_factory=lambda: ObjectiveSchema(metric, direction))


@dataclass
class TokenizerSchema:
    path: Optional[str] = None  # a local Hugging Face tokenizer.json or folder; None = train byte-level BPE
    bos_token: Optional[str] = None  # None: from tokenizer_config.json, else <|bos|> (added)
    eos_token: Optional[str] = None  # None: from tokenizer_config.json, else a well-known EOS name
    pad_token: Optional[str] = None  # None: from tokenizer_config.json, else the EOS


@dataclass
class RowSetSchema:
    """A user SFT or preference file and how to read it (see llmstages.data.formats)."""

    path: Optional[str] = None  # None = the built-in set
    format: str = "auto"
    columns: Optional[dict[str, str]] = None  # canonical field -> the file column name
    system_prompt: Optional[str] = None


@dataclass
class DataSourceSchema:
    corpus: list[str] = field(default_factory=list)  # files, folders or globs; empty = the stdlib corpus
    corpus_format: str = "auto"  # auto | text | jsonl | parquet | hf
    text_column: str = "text"
    hf_split: str = "train"
    max_corpus_mb: Optional[float] = 8.0  # None = no cap
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    sft: RowSetSchema = field(default_factory=RowSetSchema)
    preference: RowSetSchema = field(default_factory=RowSetSchema)


@dataclass
class DataStageSchema:
    data: DataSourceSchema = field(default_factory=DataSourceSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    out_dir: str = "outputs/data"
    vocab_size: int = 4096
    tokenizer_sample_mb: float = 64.0
    val_fraction: float = 0.05
    arithmetic_max: int = 99
    heldout_fraction: float = 0.1
    arithmetic_corpus_passes: int = 8
    seed: int = 1234
    objective: ObjectiveSchema = _objective("train_tokens", "maximize")


@dataclass
class TrainStageSchema:
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    probes: ProbesSchema = field(default_factory=ProbesSchema)
    data_dir: str = "outputs/data"
    out_dir: Optional[str] = None  # None: outputs/<stage> in the pipeline, Hydra's run folder for ad-hoc runs
    batch_size: int = 16
    num_workers: int = 0
    objective: ObjectiveSchema = _objective("val_loss", "minimize")


@dataclass
class PretrainSchema(TrainStageSchema):
    model: ModelSchema = field(default_factory=ModelSchema)
    seq_len: int = 256


@dataclass
class SFTSchema(TrainStageSchema):
    init_from: str = "outputs/pretrain"
    max_len: int = 128
    long_prompt: str = "truncate_left"  # truncate_left | drop
    packing: bool = False
    padding_free: bool = False
    eval_max_new_tokens: int = 24
    eval_limit: int = 600
    objective: ObjectiveSchema = _objective("exact_match", "maximize")


@dataclass
class RewardSchema(TrainStageSchema):
    init_from: str = "outputs/sft"
    max_len: int = 128
    long_prompt: str = "truncate_left"
    padding_free: bool = False
    objective: ObjectiveSchema = _objective("val_accuracy", "maximize")


@dataclass
class RolloutSchema:
    """What PPO, GRPO and online DPO share: how responses are sampled and rewarded."""

    minibatch_size: int = 16
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reward: str = "model"  # model | exact_match | model+exact_match | verifiable_or_model
    exact_match_weight: float = 1.0
    verifiable_tasks: list[str] = field(default_factory=lambda: ["arithmetic"])  # for verifiable_or_model
    missing_eos_penalty: float = 1.0


@dataclass
class PPOSchema(RolloutSchema):
    rollout_batch_size: int = 32
    clip_range: float = 0.2
    ppo_epochs: int = 2
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: Optional[float] = None  # None: fixed kl_coef; else adaptive (Ziegler et al. 2019)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    value_model: str = "reward_model"  # reward_model (separate critic initialised from it) | policy_head
    whiten_advantages: bool = True
    reward_norm: bool = False
    reward_clip: float = 0.0  # 0 = off


@dataclass
class DPOSchema(RolloutSchema):
    pairs: str = "offline"  # offline (the data stage's preference pairs) | online (sampled, ranked by the reward)
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_coef: float = 0.0  # RPO: weight of the chosen responses' NLL
    batch_size: int = 16  # offline: pairs per optimizer step
    max_len: int = 128
    long_prompt: str = "truncate_left"
    prompts_per_step: int = 16  # online: prompts sampled per iteration, one pair each
    samples_per_prompt: int = 4
    minibatch_size: int = 4  # online: pairs per optimizer step
    epochs: int = 1


@dataclass
class GRPOSchema(RolloutSchema):
    prompts_per_step: int = 8
    clip_range: float = 0.2
    group_size: int = 8
    epochs: int = 1
    kl_coef: float = 0.04


@dataclass
class RLHFSchema:
    algorithm: str = "ppo"  # ppo | dpo | grpo: which of the sections below is used
    ppo: PPOSchema = field(default_factory=PPOSchema)
    dpo: DPOSchema = field(default_factory=DPOSchema)
    grpo: GRPOSchema = field(default_factory=GRPOSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    probes: ProbesSchema = field(default_factory=ProbesSchema)
    data_dir: str = "outputs/data"
    policy_from: str = "outputs/sft"
    reward_from: str = "outputs/reward"
    out_dir: Optional[str] = None
    eval_limit: int = 600
    eval_max_new_tokens: int = 24
    num_workers: int = 0
    balance_tasks: bool = True
    objective: ObjectiveSchema = _objective("rlhf_reward", "maximize")


SCHEMAS: dict[str, type] = {
    "data": DataStageSchema,
    "pretrain": PretrainSchema,
    "sft": SFTSchema,
    "reward": RewardSchema,
    "rlhf": RLHFSchema,
}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key."""


def validate(stage: str, cfg: DictConfig | dict, source: str = "config") -> DictConfig:
    """Merge ``cfg`` onto the stage schema: unknown keys and wrong types raise :class:`ConfigError`.

    Hydra's own ``hydra`` node, if present, is ignored. Returns a read-only typed config.
    """
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[stage]), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", err)).strip().splitlines()[0]  # OmegaConf appends full_key/object_type lines
        raise ConfigError(f"{source}: invalid {stage} config at key '{key}': {msg}") from err
    _check_values(stage, merged, source)
    OmegaConf.set_readonly(merged, True)
    return merged


def _check_values(stage: str, cfg: DictConfig, source: str) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {stage}.{key}: {msg}")

    if "optim" in cfg and cfg.optim.lr <= 0:
        bad("optim.lr", f"must be > 0, got {cfg.optim.lr}")
    if "optim" in cfg and cfg.optim.warmup_steps < 0:
        bad("optim.warmup_steps", f"must be >= 0, got {cfg.optim.warmup_steps}")
    if "optim" in cfg and not 0 <= cfg.optim.min_lr_ratio <= 1:
        bad("optim.min_lr_ratio", f"must be in [0, 1] (the final learning rate over optim.lr), got "
                                  f"{cfg.optim.min_lr_ratio}")
    if "trainer" in cfg:
        t = cfg.trainer
        for key in ("max_steps", "val_check_interval", "log_every_n_steps", "accumulate_grad_batches",
                    "limit_val_batches"):
            if t[key] <= 0:
                bad(f"trainer.{key}", f"must be > 0, got {t[key]}")
    if "trainer" in cfg:
        t = cfg.trainer
        if t.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
            bad("trainer.accelerator", f"expected auto, cpu, gpu, cuda or mps, got {t.accelerator!r}")
        if isinstance(t.devices, int) and t.devices < 1 and not (t.devices == -1 and t.accelerator in ("gpu", "cuda")):
            bad("trainer.devices", f"must be >= 1 (processes, one per device), or -1 for every visible GPU with "
                                   f"trainer.accelerator=gpu; got {t.devices} with accelerator={t.accelerator}")
        if t.num_nodes < 1:
            bad("trainer.num_nodes", f"must be >= 1, got {t.num_nodes}")
    if "trainer" in cfg and str(cfg.trainer.precision) not in PRECISIONS:
        bad("trainer.precision", f"unknown value {cfg.trainer.precision!r}; expected auto, 32-true, bf16-mixed, "
            "16-mixed, bf16-true, 16-true or 64-true (transformer-engine on GPUs with it installed)")
    if cfg.objective.direction not in DIRECTIONS:
        bad("objective.direction", f"expected minimize or maximize, got {cfg.objective.direction!r}")
    if not cfg.objective.metric:
        bad("objective.metric", "is empty: name a key of the stage's metrics.json (e.g. val_loss)")
    if "probes" in cfg and cfg.probes.max_new_tokens < 1:
        bad("probes.max_new_tokens", f"expected at least 1, got {cfg.probes.max_new_tokens} "
            "(to skip the probes, set probes.prompts=[])")
    if "logger" in cfg:
        for b in cfg.logger.backends:
            if b not in ("mlflow", "wandb", "csv"):
                bad("logger.backends", f"unknown backend {b!r}; expected mlflow, wandb or csv")
    if stage == "rlhf":
        positive = [f"ppo.{k}" for k in ("rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                                         "temperature", "top_p")]
        positive += [f"grpo.{k}" for k in ("prompts_per_step", "minibatch_size", "epochs", "max_new_tokens",
                                           "temperature", "top_p")]
        positive += [f"dpo.{k}" for k in ("batch_size", "max_len", "prompts_per_step", "minibatch_size", "epochs",
                                          "max_new_tokens", "temperature", "top_p")]
        positive += ["eval_max_new_tokens"]
        for key in positive:
            if OmegaConf.select(cfg, key) <= 0:
                bad(key, f"must be > 0, got {OmegaConf.select(cfg, key)}")
        for key in ("ppo.kl_coef", "grpo.kl_coef", "eval_limit", "ppo.top_k", "grpo.top_k", "dpo.top_k",
                    "ppo.reward_clip"):
            if OmegaConf.select(cfg, key) < 0:
                bad(key, f"must be >= 0, got {OmegaConf.select(cfg, key)}")
        if not 0 <= cfg.dpo.label_smoothing < 0.5:
            bad("dpo.label_smoothing", f"must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
        if cfg.algorithm not in ALGORITHMS:
            bad("algorithm", f"unknown algorithm {cfg.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        for algo in ("ppo", "grpo", "dpo"):
            if cfg[algo].reward not in REWARDS:
                bad(f"{algo}.reward", f"expected one of {', '.join(REWARDS)}, got {cfg[algo].reward!r}")
        if cfg.ppo.value_model not in ("reward_model", "policy_head"):
            bad("ppo.value_model", f"expected reward_model or policy_head, got {cfg.ppo.value_model!r}")
        if cfg.ppo.kl_estimator not in ("k1", "k2", "k3"):
            bad("ppo.kl_estimator", f"expected k1, k2 or k3, got {cfg.ppo.kl_estimator!r}")
        if cfg.ppo.rollout_batch_size % cfg.ppo.minibatch_size:
            bad("ppo.minibatch_size", "must divide ppo.rollout_batch_size")
        if cfg.ppo.kl_target is not None and cfg.ppo.kl_target <= 0:
            bad("ppo.kl_target", f"must be > 0 (or null for a fixed kl_coef), got {cfg.ppo.kl_target}")
        if cfg.grpo.group_size < 2:
            bad("grpo.group_size", f"must be >= 2 (advantages are relative to the group), got {cfg.grpo.group_size}")
        if (cfg.grpo.prompts_per_step * cfg.grpo.group_size) % cfg.grpo.minibatch_size:
            bad("grpo.minibatch_size", "must divide grpo.prompts_per_step * grpo.group_size")
        if cfg.dpo.pairs not in ("offline", "online"):
            bad("dpo.pairs", f"expected offline or online, got {cfg.dpo.pairs!r}")
        if cfg.dpo.samples_per_prompt < 2:
            bad("dpo.samples_per_prompt", f"must be >= 2 (a pair is two of them), got {cfg.dpo.samples_per_prompt}")
        if cfg.dpo.prompts_per_step % cfg.dpo.minibatch_size:
            bad("dpo.minibatch_size", "must divide dpo.prompts_per_step (one pair per prompt)")
        online_dpo = cfg.algorithm == "dpo" and cfg.dpo.pairs == "online"
        if cfg.algorithm in ("ppo", "grpo") or online_dpo:  # one training step (an iteration): several optimizer steps
            c = cfg[cfg.algorithm]
            if cfg.algorithm == "ppo":
                per_iter = c.ppo_epochs * c.rollout_batch_size // c.minibatch_size
            elif cfg.algorithm == "grpo":
                per_iter = c.epochs * c.prompts_per_step * c.group_size // c.minibatch_size
            else:
                per_iter = c.epochs * c.prompts_per_step // c.minibatch_size
            if cfg.trainer.max_steps % per_iter:
                bad("trainer.max_steps", f"counts optimizer steps, {per_iter} per {cfg.algorithm} iteration: use a "
                                         f"multiple of {per_iter}, got {cfg.trainer.max_steps}")
        if cfg.dpo.beta <= 0:
            bad("dpo.beta", f"must be > 0, got {cfg.dpo.beta}")
    for key in ("long_prompt", "dpo.long_prompt"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in ("truncate_left", "drop"):
            bad(key, f"expected truncate_left or drop, got {value!r}")
    if stage == "data":
        from .data.formats import PREFERENCE_FORMATS, SFT_FORMATS

        d = cfg.data
        if not 0 < cfg.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
        if d.corpus_format != "auto" and not d.corpus:
            bad("data.corpus", f"is empty (the stdlib corpus) but data.corpus_format={d.corpus_format}: give the "
                               "files, folders or datasets to read")
        if d.corpus_format not in CORPUS_FORMATS:
            bad("data.corpus_format", f"expected one of {', '.join(CORPUS_FORMATS)}, got {d.corpus_format!r}")
        if d.max_corpus_mb is not None and d.max_corpus_mb <= 0:
            bad("data.max_corpus_mb", f"must be > 0 (or null for no cap), got {d.max_corpus_mb}")
        for key, formats in (("sft", SFT_FORMATS), ("preference", PREFERENCE_FORMATS)):
            if d[key].format not in formats:
                bad(f"data.{key}.format", f"expected one of {', '.join(formats)}, got {d[key].format!r}")
