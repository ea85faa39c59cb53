"""Every config composes and validates; bad keys and types fail naming the key; params.yaml is up to date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from llmstages import cli
from llmstages.cli import compose_params
from llmstages.config import SCHEMAS, STAGES, ConfigError, validate
from llmstages.runtime import check_trainer

GROUP_OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "optim", "trainer", "logger", "data")}


def test_required_groups_exist():
    assert set(GROUP_OPTIONS["model"]) >= {"tiny", "small", "base"}
    assert set(GROUP_OPTIONS["trainer"]) >= {"cpu", "gpu", "ddp"}
    assert set(GROUP_OPTIONS["logger"]) >= {"mlflow", "wandb", "csv", "none", "many"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_and_validates(stage):
    cfg = validate(stage, compose(stage))
    assert cfg.logger.backends == ["mlflow"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_group_option_validates(group, option):
    stage = {"model": "pretrain", "data": "data"}.get(group, "sft")
    cfg = validate(stage, compose(stage, [f"{group}={option}"]))
    assert cfg[group] is not None


TRAINING = ("pretrain", "sft", "reward", "rlhf")


def compositions(path: Path) -> list[tuple[str, list[str]]]:
    """How the YAML file ``path`` under conf/ takes part in a config: ``(stage, overrides)`` to compose with
    ``llmstages <stage>``, or ``("pipeline", overrides)`` for params.yaml (conf/config.yaml)."""
    rel = path.relative_to(CONF)
    group, name = rel.parent.as_posix(), rel.stem
    table = {
        ".": [("pipeline", [])] if name == "config" else [(s, []) for s in STAGES],  # config.yaml, entry_common.yaml
        "entry": [(name, [])],
        "stage": [("pipeline", [])],  # each is one section of params.yaml
        "experiment": [("pipeline", [f"+experiment={name}"])],
        **{f"experiment_stage/{s}": [(s, [f"experiment={name}"])] for s in STAGES},
        "hparams_search": [(name.split("_")[0], [f"hparams_search={name}"])],
        "rlhf_algorithm": [("rlhf", [f"algorithm={name}"])],
        "model": [("pretrain", [f"model={name}"])],
        "data": [("data", [f"data={name}"])],
        **{g: [(s, [f"{g}={name}"]) for s in TRAINING] for g in ("optim", "trainer", "logger", "probes")},
        "lora": [(s, [f"lora={name}"]) for s in ("sft", "reward", "rlhf")],
    }
    assert group in table, f"conf/{rel}: a config folder that this test does not compose yet; add it to the table"
    return table[group]


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_under_conf_composes_and_validates(path, tmp_path):
    """Every file under conf/, found recursively (a new one is tested without being listed here)."""
    assert path.name != "params.yaml"
    for stage, overrides in compositions(path):
        if stage == "pipeline":  # composes and validates every stage section, as `llmstages params` does
            compose_params(overrides, tmp_path / "params.yaml")
            assert set(yaml.safe_load((tmp_path / "params.yaml").read_text())) == set(STAGES)
        else:
            assert validate(stage, compose(stage, overrides)) is not None


def test_schemas_hold_types_not_defaults():
    """One source for each value: conf/ gives every value; a schema only types and checks it."""
    for stage, schema in SCHEMAS.items():
        empty = OmegaConf.structured(schema)
        leaves = OmegaConf.to_container(empty, resolve=False, throw_on_missing=False)

        def walk(node, prefix=""):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

        defaults = [k for k, v in walk(leaves) if v != "???"]
        assert not defaults, f"{stage} schema has defaults for {defaults}; they belong in conf/"
    with pytest.raises(ConfigError, match=re.escape("sft config has no value for optim.lr (every key comes from conf/")):
        cfg = OmegaConf.to_container(compose("sft"))
        del cfg["optim"]["lr"]  # e.g. a params.yaml composed before the key existed
        validate("sft", cfg)


def test_an_experiment_preset_gives_a_single_stage_the_same_section_as_the_pipeline(tmp_path):
    """`llmstages <stage> experiment=tiny` runs with exactly the section that `+experiment=tiny` puts in params.yaml."""
    params = yaml.safe_load(compose_params(["+experiment=tiny"], tmp_path / "params.yaml").read_text())
    for stage in STAGES:
        alone = OmegaConf.to_container(compose(stage, ["experiment=tiny"]), resolve=True)
        assert alone == params[stage], stage
    assert params["pretrain"]["model"]["d_model"] == 32 and params["sft"]["trainer"]["max_steps"] == 20
    # A group chosen on the command line beats the preset's choice, in either order (found by a fresh-user check).
    small = compose("pretrain").model.d_model
    assert compose("pretrain", ["experiment=tiny", "model=small"]).model.d_model == small
    assert compose("pretrain", ["model=small", "experiment=tiny"]).model.d_model == small


def test_model_presets_sizes():
    from llmstages.model import GPT, GPTConfig

    sizes = {}
    for name in ("tiny", "small", "base"):
        m = dict(compose("pretrain", [f"model={name}"]).model)
        m["vocab_size"] = 4096
        sizes[name] = GPT(GPTConfig(**m)).num_params(non_embedding=False)
    assert sizes["tiny"] < 1e6 < sizes["small"] < 10e6
    assert 80e6 < sizes["base"] < 130e6  # the ~100M GPU preset


def test_misspelled_key_names_the_key():
    cfg = OmegaConf.to_container(compose("pretrain"))
    cfg["trainer"]["max_stepz"] = 5
    with pytest.raises(ConfigError, match=re.escape("key 'trainer.max_stepz': Key 'max_stepz' not in "
                                                    "'TrainerSchema'; did you mean 'trainer.max_steps'?")):
        validate("pretrain", cfg)
    cfg = OmegaConf.to_container(compose("sft"))
    cfg["lrr"] = 1  # top level: the closest setting anywhere in the schema
    with pytest.raises(ConfigError, match=re.escape("key 'lrr': Key 'lrr' not in 'SFTSchema'; did you mean "
                                                    "'optim.lr'?")):
        validate("sft", cfg)
    del cfg["lrr"]
    cfg["zzzz"] = 1  # nothing close: no suggestion
    with pytest.raises(ConfigError, match=r"key 'zzzz': Key 'zzzz' not in 'SFTSchema'$"):
        validate("sft", cfg)


def test_wrong_type_names_the_key():
    cfg = OmegaConf.to_container(compose("sft"))
    cfg["optim"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        validate("sft", cfg)


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="kl_estimator"):
        validate("rlhf", compose("rlhf", ["ppo.kl_estimator=k9"]))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward"])
def test_bad_precision_is_refused_before_training(stage):
    with pytest.raises(ConfigError, match=rf"{stage}\.trainer\.precision: unknown value 'fp8'"):
        validate(stage, compose(stage, ["trainer.precision=fp8"]))
    for ok in ("auto", "32-true", "bf16-mixed", "32"):
        assert validate(stage, compose(stage, [f"trainer.precision={ok}"])).trainer.precision == ok


@pytest.mark.parametrize("override,message", [
    ("trainer.val_check_interval=0", "pretrain.trainer.val_check_interval: must be > 0, got 0"),
    ("trainer.log_every_n_steps=0", "pretrain.trainer.log_every_n_steps: must be > 0, got 0"),
    ("trainer.accumulate_grad_batches=0", "pretrain.trainer.accumulate_grad_batches: must be > 0, got 0"),
    ("trainer.limit_val_batches=0", "pretrain.trainer.limit_val_batches: must be > 0, got 0"),
    ("optim.warmup_steps=-5", "pretrain.optim.warmup_steps: must be >= 0, got -5"),
    ("optim.min_lr_ratio=2", "pretrain.optim.min_lr_ratio: must be in [0, 1]"),
    ("trainer.devices=0", "pretrain.trainer.devices: must be >= 1 (processes, one per device), or -1 for every "
                          "visible GPU with trainer.accelerator=gpu; got 0 with accelerator=cpu"),
    ("trainer.devices=-1", "pretrain.trainer.devices: must be >= 1"),
    ("trainer.accelerator=tpu", "pretrain.trainer.accelerator: expected auto, cpu, gpu, cuda or mps, got 'tpu'"),
    ("trainer.num_nodes=0", "pretrain.trainer.num_nodes: must be >= 1, got 0"),
    ("batch_size=0", "pretrain.batch_size: must be > 0, got 0"),  # torch's own message did not name the key
    ("model.n_heads=3", "pretrain.model.d_model=256 must be divisible by model.n_heads=3"),  # checked at compose
    ("model.d_model=100", "pretrain.model.d_model / model.n_heads must be even for RoPE"),
    ("model.rope_theta=0", "pretrain.model.rope_theta must be > 0"), ("model.norm_eps=-1", "pretrain.model.norm_eps"),
    ("model.d_ff=-5", "pretrain.model.d_ff must be >= 0 (0 = 8/3 x d_model"),  # trained as if 0 before
    ("seq_len=0", "pretrain.seq_len: must be > 0"),
    ("seq_len=4096", "pretrain.seq_len: must be at most model.max_seq_len=512, got 4096"),
    ("num_workers=-1", "pretrain.num_workers: must be >= 0")])
def test_trainer_and_optim_values_that_would_fail_mid_run_are_refused_first(override, message):
    """Found by fresh-user checks: these ran to a ZeroDivisionError or a traceback inside Lightning, or after
    training (or, for accumulate_grad_batches=0, wrote an untrained model with train_loss NaN)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate("pretrain", compose("pretrain", [override]))


def test_every_trainer_check_is_one_function_and_machine_checks_wait_for_a_run_here():
    """check_trainer holds every trainer check: values always, this machine's only when the stage runs here
    (params.yaml may be composed for a GPU machine on a laptop)."""
    gpu = compose("pretrain", ["trainer.accelerator=gpu"])
    assert validate("pretrain", gpu).trainer.accelerator == "gpu"  # composing params: fine
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=re.escape("pretrain.trainer.accelerator: is gpu, but this torch")):
            validate("pretrain", gpu, runs_here=True)
    with pytest.raises(ConfigError, match=re.escape("pretrain.trainer.strategy: 'ddp_fork' starts its processes by "
                                                    "spawn or fork")):
        validate("pretrain", compose("pretrain", ["trainer.strategy=ddp_fork"]), runs_here=True)
    # The RL stage steps the optimizer itself: accumulation is refused in one line, before any training.
    with pytest.raises(ConfigError, match=re.escape("rlhf.trainer.accumulate_grad_batches: is 2, but "
                                                    "rlhf.algorithm=ppo steps the optimizer itself (manual optimization)")):
        validate("rlhf", compose("rlhf", ["trainer.accumulate_grad_batches=2"]))
    offline = ["algorithm=dpo", "dpo.pairs=offline", "trainer.accumulate_grad_batches=2"]
    assert validate("rlhf", compose("rlhf", offline)).trainer.accumulate_grad_batches == 2  # automatic optimization
    assert check_trainer(compose("pretrain").trainer, runs_here=True) == []


def test_sft_defaults_are_padding_free_and_packing_alone_still_validates():
    cfg = validate("sft", compose("sft"))
    assert cfg.padding_free and not cfg.packing and cfg.trainer.max_steps == 2000
    assert validate("sft", compose("sft", ["packing=true"])).packing  # packed items: padding_free does not apply


@pytest.mark.parametrize("field,value,message", [("dropout", 2.0, "model.dropout must be in [0, 1), got 2.0"),
                                                 ("d_model", 0, "model.d_model must be >= 1, got 0"),
                                                 ("n_layers", 0, "model.n_layers must be >= 1, got 0")])
def test_bad_model_shape_is_a_one_line_value_error(field, value, message):
    from llmstages.model import GPTConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**{"vocab_size": 64, field: value})


@pytest.mark.parametrize("override,key", [("algorithm=reinforce", "rlhf.algorithm"), ("grpo.group_size=1", "grpo.group_size"),
                                          ("grpo.minibatch_size=5", "grpo.minibatch_size"), ("dpo.beta=0", "dpo.beta"),
                                          ("ppo.reward=length", "ppo.reward"), ("ppo.kl_target=-1", "ppo.kl_target"),
                                          ("ppo.minibatch_size=0", "ppo.minibatch_size"),
                                          ("ppo.max_new_tokens=0", "ppo.max_new_tokens"),
                                          ("grpo.prompts_per_step=0", "grpo.prompts_per_step"),
                                          ("grpo.epochs=0", "grpo.epochs"), ("dpo.batch_size=0", "dpo.batch_size"),
                                          ("ppo.kl_coef=-1", "ppo.kl_coef"), ("eval_limit=-1", "eval_limit"),
                                          ("dpo.label_smoothing=1.5", "dpo.label_smoothing"),
                                          ("dpo.pairs=mined", "dpo.pairs"), ("dpo.samples_per_prompt=1", "dpo.samples_per_prompt"),
                                          ("dpo.minibatch_size=5", "dpo.minibatch_size"), ("dpo.reward=length", "dpo.reward"),
                                          ("dpo.epochs=0", "dpo.epochs"), ("dpo.lr=0", "dpo.lr"),
                                          ("eval_max_new_tokens=0", "eval_max_new_tokens"),
                                          ("trainer.max_steps=10", "trainer.max_steps"),
                                          ("trainer.precision=fp8", "trainer.precision"),
                                          ("probes.max_new_tokens=0", "probes.max_new_tokens"),
                                          ("objective.direction=sideways", "objective.direction"),
                                          ("ppo.top_p=2", r"ppo.top_p: must be in \(0, 1\]"),
                                          ("grpo.clip_range=-1", "grpo.clip_range: must be > 0"),
                                          ("ppo.value_clip_range=0", "ppo.value_clip_range"),
                                          ("ppo.gamma=2", r"ppo.gamma: must be in \[0, 1\]"),
                                          ("ppo.lam=-0.5", "ppo.lam"), ("ppo.vf_coef=-1", "ppo.vf_coef")])
def test_bad_rlhf_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate("rlhf", compose("rlhf", [override]))


@pytest.mark.parametrize("override,key", [("eval_limit=-1", "eval_limit"), ("eval_max_new_tokens=0", "eval_max_new_tokens"),
                                          ("eval_max_new_tokens=-1", "eval_max_new_tokens")])
def test_bad_sft_evaluation_settings_name_the_key(override, key):
    # a negative eval_limit reached random.sample ("Sample larger than population"), a negative token budget the KV cache
    with pytest.raises(ConfigError, match=key):
        validate("sft", compose("sft", [override]))


def test_values_the_stage_would_refuse_are_refused_when_params_yaml_is_composed():
    with pytest.raises(ConfigError, match=r"data\.vocab_size: must be in 262\.\.1048576, got 10"):
        validate("data", compose("data", ["vocab_size=10"]))
    for stage in ("sft", "reward"):
        with pytest.raises(ConfigError, match=rf"{stage}\.batch_size: must be > 0, got 0"):
            validate(stage, compose(stage, ["batch_size=0"]))
        with pytest.raises(ConfigError, match=rf"{stage}\.max_len: must be > 0, got -1"):  # was: every row dropped
            validate(stage, compose(stage, ["max_len=-1"]))


def test_each_algorithm_has_its_own_group_with_paper_defaults():
    group = {a: OmegaConf.load(CONF / "rlhf_algorithm" / f"{a}.yaml") for a in ("ppo", "dpo", "grpo")}
    assert group["dpo"].beta == 0.1 and group["dpo"].sft_coef == 0.0 and group["dpo"].pairs == "offline"  # Rafailov et al.
    g = group["grpo"]
    assert g.kl_coef == 0.04 and g.clip_range == 0.2 and g.epochs == 1 and g.reward == "model"  # Shao et al. 2024
    p = group["ppo"]
    assert p.clip_range == 0.2 and p.lam == 0.95 and p.gamma == 1.0 and p.reward == "model"  # Huang et al. 2024
    cfg = validate("rlhf", compose("rlhf"))  # the pipeline's own choices for this task sit on top
    assert cfg.algorithm == "ppo" and cfg.ppo.reward == "verifiable_or_model" == cfg.grpo.reward
    assert cfg.grpo.kl_coef == 0.15 and cfg.ppo.kl_coef == 0.3
    assert cfg.dpo.pairs == "online" and cfg.dpo.reward == "verifiable_or_model" and cfg.dpo.beta == 2.0
    # optim.lr is the running algorithm's own lr unless set: one key to sweep, and no stale lr for another algorithm
    assert cfg.optim.lr == cfg.ppo.lr == cfg.grpo.lr == 6e-5 and cfg.dpo.lr < cfg.ppo.lr
    assert validate("rlhf", compose("rlhf", ["algorithm=dpo"])).optim.lr == cfg.dpo.lr
    assert validate("rlhf", compose("rlhf", ["algorithm=dpo", "dpo.lr=2e-5"])).optim.lr == 2e-5
    assert validate("rlhf", compose("rlhf", ["algorithm=dpo", "optim.lr=1e-4"])).optim.lr == 1e-4
    with pytest.raises(ConfigError, match=r"rlhf\.dpo\.lr: must be > 0, got 0\.0 \(optim\.lr takes it\)"):
        validate("rlhf", compose("rlhf", ["algorithm=dpo", "dpo.lr=0"]))  # the key the user set, not optim.lr
    # DVC resolves params.yaml itself: an unknown algorithm must resolve (optim.lr null) and be named by the stage
    resolved = OmegaConf.to_container(compose("rlhf", ["algorithm=reinforce"]), resolve=True)
    assert resolved["optim"]["lr"] is None
    with pytest.raises(ConfigError, match=r"rlhf\.algorithm: unknown algorithm 'reinforce'; expected one of ppo, dpo"):
        validate("rlhf", resolved)
    with pytest.raises(ConfigError, match="4 per dpo iteration"):  # online DPO counts optimizer steps too
        validate("rlhf", compose("rlhf", ["algorithm=dpo", "trainer.max_steps=10"]))
    assert validate("rlhf", compose("rlhf", ["algorithm=grpo"])).algorithm == "grpo"


def test_override_of_unknown_key_fails_in_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose("pretrain", ["trainer.max_stepz=5"])


def test_committed_params_yaml_equals_fresh_composition(tmp_path):
    fresh = yaml.safe_load(compose_params([], tmp_path / "params.yaml").read_text())
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == fresh, "params.yaml is stale: run `llmstages params` and commit it"
    assert set(committed) == set(STAGES)
    for stage in STAGES:
        validate(stage, committed[stage], "params.yaml")


def test_pipeline_override_reaches_only_its_section(tmp_path):
    p = yaml.safe_load(compose_params(["sft.optim.lr=1e-4"], tmp_path / "p.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert p["sft"]["optim"]["lr"] == 1e-4
    assert {s for s in STAGES if p[s] != base[s]} == {"sft"}


def test_tiny_experiment_composes(tmp_path):
    p = yaml.safe_load(compose_params(["+experiment=tiny"], tmp_path / "p.yaml").read_text())
    assert p["pretrain"]["model"]["d_model"] == 32
    for stage in STAGES:
        validate(stage, p[stage])
    # a key without its stage's section: named, with each stage's key (Hydra would suggest "+lr", read by no stage)
    for bad in ("lr=1e-3", "+lr=1e-3"):
        with pytest.raises(SystemExit, match=r"no stage reads 'lr'; did you mean 'pretrain\.optim\.lr', "
                                             r"'sft\.optim\.lr', 'reward\.optim\.lr', 'rlhf\.optim\.lr'\?"):
            cli.main(["params", bad, "-o", str(tmp_path / "bad.yaml")])
    assert not (tmp_path / "bad.yaml").exists()
    for bad, hint in (("algorithm=dpo", "'rlhf.algorithm'"), ("val_fraction=0.1", "'data.val_fraction'"),
                      ("batch_size=4", "'pretrain.batch_size', 'sft.batch_size', 'reward.batch_size', "
                                       "'rlhf.dpo.batch_size'"),  # the key itself, in every stage that has it
                      ("vocab_size=300", "'data.vocab_size', 'pretrain.model.vocab_size'")):
        with pytest.raises(SystemExit, match=f"did you mean {re.escape(hint)}\\?$"):
            cli.main(["params", bad, "-o", str(tmp_path / "bad.yaml")])
    # `++key=value` (add or override) and `+key` stay Hydra's to judge: a stage's key is not "read by no stage"
    assert cli.main(["params", "++pretrain.optim.lr=2e-3", "-o", str(tmp_path / "pp.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "pp.yaml").read_text())["pretrain"]["optim"]["lr"] == 2e-3
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["params", "-o", str(tmp_path / "no" / "such" / "p.yaml")])
    # `llmstages params experiment=tiny`, written as for a single stage, composes the same file
    assert cli.main(["params", "experiment=tiny", "-o", str(tmp_path / "q.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "q.yaml").read_text()) == p


def test_unknown_override_checks_keys_against_the_schema():
    from llmstages.config import unknown_override

    groups = {"model", "optim", "trainer", "logger", "rlhf_algorithm", "experiment"}  # folders of conf/

    assert unknown_override("rlhf", "ppo.kl_coeff=0.3") == ("no key 'ppo.kl_coeff' in the rlhf config; "
                                                             "did you mean 'ppo.kl_coef'?")
    for ok in ("ppo.kl_coef=0.3", "trainer.max_steps=1,2", "+trainer.foo=1", "~trainer.max_steps", "model=tiny",
               "hydra.run.dir=x"):
        assert unknown_override("rlhf", ok, groups) is None, ok
    # an unknown first part: named, with a suggestion only where the rest of the key fits under it
    assert unknown_override("rlhf", "nosuch.node.key=1") == "no key 'nosuch.node.key' in the rlhf config"
    assert unknown_override("pretrain", "lora.r=4") == "no key 'lora.r' in the pretrain config"  # not 'optim.lr.r'
    assert unknown_override("pretrain", "trainr.max_steps=1") == ("no key 'trainr.max_steps' in the pretrain config; "
                                                                  "did you mean 'trainer.max_steps'?")
    assert unknown_override("data", "data.val_fraction=0.5", prefix="data.") == (  # a key of the section above
        "no key 'data.data.val_fraction' in the data config; did you mean 'data.val_fraction'?")
    # `llmstages params data.sft.path=...`: the data section's key is data.sft.path, in params.yaml data.data.sft.path
    assert unknown_override("data", "sft.path=x.jsonl", prefix="data.") == (
        "no key 'data.sft.path' in the data config; did you mean 'data.data.sft.path'?")
    # A key without a dot: the setting it names deeper in the schema, or the closest one; config groups pass.
    assert unknown_override("pretrain", "lr=1e-3", groups) == ("no key 'lr' in the pretrain config; did you mean "
                                                               "'optim.lr'?")
    assert unknown_override("sft", "max_stepz=5", groups) == ("no key 'max_stepz' in the sft config; did you mean "
                                                              "'trainer.max_steps'?")
    assert unknown_override("data", "corpus=[a.txt]", groups) == ("no key 'corpus' in the data config; did you mean "
                                                                  "'data.corpus'?")
    assert unknown_override("sft", "foo=1", groups) == "no key 'foo' in the sft config"
    for ok in ("model=tiny", "trainer=gpu", "algorithm=dpo", "out_dir=x", "hydra/launcher=basic", "experiment=tiny"):
        assert unknown_override("rlhf", ok, groups) is None, ok
