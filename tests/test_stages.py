"""Each stage on the tiny model with a real Lightning Trainer and a real MLflow store; values checked."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import numpy as np
import pytest
import torch

from llmstages.checkpoint import load_output
from llmstages.tokenizer import load_tokenizer


def test_data_stage_outputs(tiny_run):
    work, m = tiny_run
    data = work / "outputs/data"
    meta = json.loads((data / "meta.json").read_text())
    assert m["data"]["vocab_size"] == meta["vocab_size"] <= 512
    assert len(np.memmap(data / "train.bin", dtype=np.uint16, mode="r")) == meta["train_tokens"] > 10_000
    assert (data / "metrics.json").is_file() and (data / "config.yaml").is_file()


def test_pretrain_learns(tiny_run):
    work, m = tiny_run
    pm = m["pretrain"]
    assert pm["steps"] == 40 and pm["resumed_from_step"] == 0
    # 40 tiny steps: far from converged, but well below the loss of a uniform guess over the vocabulary.
    assert pm["val_loss"] < np.log(m["data"]["vocab_size"]) - 0.5
    assert pm["val_perplexity"] == pytest.approx(np.exp(pm["val_loss"]), rel=1e-4)
    assert json.loads((work / "outputs/pretrain/metrics.json").read_text())["steps"] == 40


def test_stage_outputs_round_trip(tiny_run):
    work, _ = tiny_run
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        # only the reward model carries a scalar head (PPO's default value model is a separate critic, not saved)
        model, head, meta = load_output(work / "outputs" / stage, with_head=stage == "reward")
        assert meta["stage"] == stage and meta["pipeline_run"] == "test-pipeline"
        assert meta["precision"] == "32-true"  # the precision the Trainer used, recorded
        assert (head is not None) == (stage == "reward")
        tok = load_tokenizer(work / "outputs" / stage)
        assert tok.vocab_size == model.cfg.vocab_size
        assert (work / "outputs" / stage / "tokenizer_config.json").read_bytes() == \
            (work / "outputs/data/tokenizer_config.json").read_bytes()


def test_sft_changes_the_model_and_reports_both(tiny_run):
    work, m = tiny_run
    sm = m["sft"]
    for key in ("exact_match", "exact_match_arithmetic", "init_exact_match_arithmetic", "eos_fraction", "val_loss"):
        assert key in sm
    a, _, _ = load_output(work / "outputs/pretrain")
    b, _, _ = load_output(work / "outputs/sft")
    changed = [n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(a.parameters()))  # every trainable parameter moved
    # held-out exact match at each validation (after steps 10 and 20), the last equal to the final score; the final
    # validation, at the same weights as the one after step 20, reuses its answers (no third point)
    curve = (work / "outputs/sft/curves/val/exact_match.tsv").read_text().split()
    assert curve[:2] == ["step", "exact_match"] and [int(s) for s in curve[2::2]] == [9, 19]
    assert float(curve[-1]) == pytest.approx(sm["exact_match"], abs=1e-6)


def test_reward_and_rlhf_metrics(tiny_run):
    _, m = tiny_run
    assert 0.0 <= m["reward"]["val_accuracy"] <= 1.0 and m["reward"]["val_pairs"] > 0
    # Each task's accuracy comes from the same final pass as the overall one: weighted by the task's pairs, they
    # add up to it.
    rows = [json.loads(line) for line in (tiny_run[0] / "outputs/data/pref_val.jsonl").read_text().splitlines()]
    counts = Counter(r["task"] for r in rows)
    assert len(rows) == m["reward"]["val_pairs"] and len(counts) >= 2
    weighted = sum(m["reward"][f"val_accuracy_{t}"] * n for t, n in counts.items()) / len(rows)
    assert weighted == pytest.approx(m["reward"]["val_accuracy"], abs=1e-5)
    rm = m["rlhf"]
    for key in ("rlhf_reward", "sft_reward", "win_rate_vs_sft", "rlhf_kl_to_ref", "rlhf_exact_match_arithmetic"):
        assert np.isfinite(rm[key])
    assert rm["steps"] == 8
    # KL to SFT: the mean over held-out prompts, each task's mean, and the mean of those
    per_task = {k: v for k, v in rm.items() if k.startswith("rlhf_kl_to_ref_") and not k.endswith("task_balanced")}
    assert len(per_task) >= 2 and all(v >= 0 for v in per_task.values())
    assert rm["rlhf_kl_to_ref_task_balanced"] == pytest.approx(sum(per_task.values()) / len(per_task), abs=1e-5)
    assert min(per_task.values()) - 1e-6 <= rm["rlhf_kl_to_ref"] <= max(per_task.values()) + 1e-6
    assert (tiny_run[0] / "outputs/rlhf/samples.md").read_text().startswith("| prompt |")


def curve_steps(out) -> dict[str, list[int]]:
    """``{metric: steps}`` of a stage output's DVC curves (``curves/<metric>.tsv``)."""
    found = {}
    for f in sorted((out / "curves").rglob("*.tsv")):
        rows = f.read_text().splitlines()[1:]
        found[str(f.relative_to(out / "curves").with_suffix(""))] = [int(r.split("\t")[0]) for r in rows if r]
    return found


@pytest.mark.parametrize("algorithm,extra", [("dpo", ["dpo.pairs=offline"]), ("grpo", []),
                                             ("dpo", ["dpo.pairs=online"]), ("ppo", ["ppo.kl_target=1.0"])])
def test_rlhf_algorithms_on_the_tiny_pipeline(tiny_run, algorithm, extra, monkeypatch, caplog):
    from conftest import TINY, compose
    from llmstages.cli import run_stage

    work, _ = tiny_run
    monkeypatch.chdir(work)
    out = f"outputs/rlhf-{algorithm}-{'-'.join(extra)}"
    with caplog.at_level(logging.INFO, logger="llmstages"):
        m = run_stage("rlhf", compose("rlhf", [*TINY["rlhf"], f"algorithm={algorithm}", *extra,
                                               "trainer.log_every_n_steps=1"]), out, source="test")
    # the process's time split at the end (benchmarks/overhead.py reads it): its parts add up to the whole
    (split,) = [r.getMessage() for r in caplog.records if "since the process started" in r.getMessage()]
    total, startup, training, after = map(float, re.findall(r"([\d.]+) s", split))
    assert split.startswith("rlhf: ") and 0 < training < total and abs(startup + training + after - total) < 0.2
    assert m["algorithm"] == algorithm and m["steps"] == 8
    for key in ("rlhf_reward", "sft_reward", "win_rate_vs_sft", "rlhf_kl_to_ref", "rlhf_exact_match_arithmetic",
                "rlhf_mean_response_tokens", "rlhf_eos_fraction", "time_scoring_s", "time_optimisation_s"):
        assert np.isfinite(m[key]), key
    axis = curve_steps(work / out)  # one step axis: optimizer steps, as every other stage logs them
    key = "train/reward" if "train/reward" in axis else "train/dpo_loss"  # offline DPO samples nothing
    assert max(axis[key]) == m["steps"] - 1 and max(max(s) for s in axis.values()) <= m["steps"]  # val: after
    assert axis["train/lr"] == axis[key]
    if algorithm == "dpo":
        assert 0.0 <= m["dpo_val_accuracy"] <= 1.0
    if extra == ["dpo.pairs=offline"]:
        assert "time_generation_s" not in m
    else:
        assert m["time_generation_s"] >= 0.0  # seconds, rounded to 0.1: the tiny model may take less
    model, _, _ = load_output(work / out)
    sft, _, _ = load_output(work / "outputs/sft")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), sft.parameters()))


def test_stage_records_the_values_it_used(tiny_run):
    import yaml

    work, _ = tiny_run
    used = yaml.safe_load((work / "outputs/sft/config.yaml").read_text())
    assert used["trainer"]["max_steps"] == 20 and used["max_len"] == 64


def test_mlflow_runs_are_tracked_and_grouped(tiny_run):
    import mlflow

    work, m = tiny_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("llmstages")
    runs = client.search_runs([exp.experiment_id], "tags.pipeline_run = 'test-pipeline'")
    parents = [r for r in runs if r.data.tags.get("llmstages_role") == "pipeline"]
    # One parent run per pipeline execution, finished, with the five stage runs nested under it (what the
    # MLflow UI shows as one expandable group).
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name == "pipeline-test-pipeline"
    by_stage = {r.data.tags["stage"]: r for r in runs if r not in parents}
    assert set(by_stage) == {"data", "pretrain", "sft", "reward", "rlhf"}
    assert {r.data.tags["mlflow.parentRunId"] for r in by_stage.values()} == {parents[0].info.run_id}
    pre = by_stage["pretrain"]
    assert pre.data.params["trainer.max_steps"] == "40"
    assert pre.data.params["trainer.precision_used"] == "32-true"
    assert pre.data.metrics["val_loss"] == pytest.approx(m["pretrain"]["val_loss"], rel=1e-5)
    assert "train/lm_loss" in pre.data.metrics and pre.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(by_stage["rlhf"].info.run_id)}
    assert {"metrics.json", "config.yaml", "samples.md"} <= arts


def test_lineage_links_each_stage_to_the_run_that_made_its_inputs(tiny_run):
    """Tags on every stage run: versions, input hashes, output hash, and the upstream run found by content."""
    from mlflow.tracking import MlflowClient

    from llmstages.lineage import combined_md5, file_md5, tree_md5s

    work, _ = tiny_run
    client = MlflowClient(f"sqlite:///{work}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.pipeline_run = 'test-pipeline' and attributes.status = 'FINISHED'")
    by_stage = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):  # the pipeline's own run of each stage comes first
        if "stage" in r.data.tags:  # not the pipeline's parent run
            by_stage.setdefault(r.data.tags["stage"], r)
    assert set(by_stage) == {"data", "pretrain", "sft", "reward", "rlhf"}
    for stage, r in by_stage.items():
        tags = r.data.tags
        assert tags["version.torch"] == torch.__version__ and tags["git_commit"]
        out = work / "outputs" / stage
        assert tags["output_md5"] == combined_md5(tree_md5s([out]), out)
        lineage = json.loads(open(client.download_artifacts(r.info.run_id, "lineage.json")).read())
        assert lineage["output_md5"] == tags["output_md5"] and lineage["tags"]["inputs_md5"] == tags["inputs_md5"]
    ids = {s: r.info.run_id for s, r in by_stage.items()}
    up = {s: set(r.data.tags.get("upstream_run_id", "").split(",")) - {""} for s, r in by_stage.items()}
    assert up == {"data": set(), "pretrain": {ids["data"]}, "sft": {ids["data"], ids["pretrain"]},
                  "reward": {ids["data"], ids["sft"]}, "rlhf": {ids["data"], ids["sft"], ids["reward"]}}
    sft_inputs = json.loads(open(client.download_artifacts(ids["sft"], "lineage.json")).read())["inputs"]
    weights = str(work / "outputs/pretrain/model.safetensors")
    rel = {k.replace(str(work) + "/", ""): v for k, v in sft_inputs.items()}
    assert rel["outputs/pretrain/model.safetensors"] == file_md5(weights)


def test_progress_bar_counts_the_runs_steps_and_logs_lines_where_there_is_no_terminal(monkeypatch, caplog, tmp_path):
    """One bar over the run (global step of max_steps, across epochs, from the resumed step on a resume), named
    after the stage; in a redirected log (no terminal) a line every tenth of the run with the training metrics,
    and one after each validation with that validation's metrics (the bar would show the previous ones)."""
    import math

    import lightning as L

    from llmstages.model import GPTConfig
    from llmstages.callbacks import StepProgressBar
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torchdata.stateful_dataloader import StatefulDataLoader

    from llmstages.stages.pretrain import PretrainModule

    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # Rich: this console is not a terminal (a file, a pipe, CI)
    cfg = GPTConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    data = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(3)]  # 3 batches an epoch

    def fit(max_steps, ckpt_path=None, val=None):
        torch.manual_seed(0)
        optim = dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, warmup_steps=0, max_steps=max_steps,
                     min_lr_ratio=1.0)
        bar = StepProgressBar("pretrain")
        every10 = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", every_n_train_steps=10, save_top_k=-1)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, log_every_n_steps=5,
                            logger=False, default_root_dir=tmp_path, enable_model_summary=False,
                            callbacks=[bar, every10],
                            val_check_interval=10, check_val_every_n_epoch=None, num_sanity_val_steps=0)
        # Stateful, as the stages' loaders: a run resumed mid-epoch goes on there (without on_train_epoch_start)
        loader = lambda d: StatefulDataLoader(d, batch_size=None)  # noqa: E731
        with caplog.at_level(logging.INFO, logger="llmstages"):
            caplog.clear()
            trainer.fit(PretrainModule(cfg, optim, 1.0, 16), loader(data), loader(val) if val else None,
                        ckpt_path=ckpt_path)
        task = bar.progress.tasks[bar.train_progress_bar_id]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain: ")]
        return task, lines, trainer

    task, lines, trainer = fit(20, val=data[:2])
    val_lines = [line for line in lines if "validation" in line]  # one after each validation, its fresh values
    parsed = [dict(kv.split("=") for kv in line.split(" · ")[1:]) for line in val_lines]
    assert [line.split(" · ")[0] for line in val_lines] == ["pretrain: validation at step 10",
                                                             "pretrain: validation at step 20"]
    assert [sorted(m) for m in parsed] == [["val/bits_per_byte", "val/lm_loss", "val/perplexity"]] * 2
    assert parsed[-1]["val/lm_loss"] == f"{float(trainer.callback_metrics['val/lm_loss']):.4g}"
    assert all(abs(math.log(float(m["val/perplexity"])) - float(m["val/lm_loss"])) < 2e-3 for m in parsed)
    lines = [line for line in lines if line not in val_lines]
    assert (task.description, task.completed, task.total) == ("pretrain", 20, 20)  # not "Epoch 6 2/3"
    [speed] = [c for c in trainer.progress_bar_callback.progress.columns if type(c).__name__ == "SpeedColumn"]
    assert re.fullmatch(r"[\d.]+ steps/s", speed.render(task).plain)  # Lightning's says it/s
    steps = [int(re.match(r"pretrain: step (\d+)/20 \(\d+%\)", line).group(1)) for line in lines]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert "left" in lines[0] and "train/lm_loss=" not in lines[0]  # nothing logged before step 5
    assert "train/lm_loss=" in lines[-1] and "left" not in lines[-1] and "val/" not in lines[-1]
    assert re.search(r"train/lm_loss=[\d.]+", lines[-1]).group(0) == f"train/lm_loss={trainer.callback_metrics['train/lm_loss']:.4g}"

    # Resumed from the checkpoint written at step 10, in the middle of an epoch: the bar starts at step 10.
    task, lines, _ = fit(30, ckpt_path=tmp_path / "ck/step=10.ckpt")
    assert (task.completed, task.total) == (30, 30)
    assert [line.split(" (")[0] for line in lines] == [f"pretrain: step {s}/30" for s in (12, 15, 18, 21, 24, 27, 30)]
