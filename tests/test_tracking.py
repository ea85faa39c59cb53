"""Tracking as users see it: the MLflow UI server against the local store, probe tables, W&B offline folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY, wandb_records

BIN = Path(sys.executable).parent
STAGES = ("data", "pretrain", "sft", "reward", "rlhf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_ui_shows_the_pipeline_execution_as_one_group(tiny_run, tmp_path):
    """`mlflow ui` on the local store serves the five stage runs of one pipeline execution nested under one
    parent run (the UI's runs table draws runs tagged mlflow.parentRunId under their parent). Checked through
    the UI server's own endpoints: the page itself and the run search its table calls."""
    work, _ = tiny_run
    port = _free_port()
    log = open(tmp_path / "mlflow-ui.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri",
                               f"sqlite:///{work}/outputs/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow ui did not start: {(tmp_path / 'mlflow-ui.log').read_text()[-2000:]}")
                time.sleep(1)
        with urllib.request.urlopen(f"{base}/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        exps = _post(f"{base}/ajax-api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        exp_id = next(e["experiment_id"] for e in exps if e["name"] == "llmstages")
        found = _post(f"{base}/ajax-api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp_id], "filter": "tags.pipeline_run = 'test-pipeline'",
                       "max_results": 100})["runs"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found}
    parents = [rid for rid, t in tags.items() if t.get("llmstages_role") == "pipeline"]
    assert len(parents) == 1
    children = {t["stage"]: rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parents[0]}
    assert set(children) == set(STAGES)
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in found}
    assert names[parents[0]] == "pipeline-test-pipeline" and names[children["sft"]] == "sft-test-pipeline"


def test_mlflow_store_speaks_mlflows_model_training_vocabulary(tiny_run):
    """After the tiny pipeline: a model-training experiment; every stage run with a description, its data as
    dataset inputs (name + MD5 digest) and its output as a logged model; the final policy registered; the
    parent run with each stage's key metric, the RL algorithm and a description."""
    from mlflow.tracking import MlflowClient

    work, metrics = tiny_run
    client = MlflowClient(f"sqlite:///{work}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("llmstages")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], "tags.pipeline_run = 'test-pipeline'")
    stage_runs = {r.data.tags["stage"]: r for r in runs if "stage" in r.data.tags}
    (parent,) = [r for r in runs if r.data.tags.get("llmstages_role") == "pipeline"]
    assert set(stage_runs) == set(STAGES)
    for stage, run in stage_runs.items():
        assert run.data.tags["mlflow.note.content"].startswith(f"{stage}: ")
        assert run.data.tags["mlflow.source.name"] == f"llmstages {stage}"
        # final values under their metrics.json names (no final/ or eval/ copies); the resume step is a tag
        assert not [k for k in run.data.metrics if k.startswith(("final/", "eval/"))]
        if stage == "data":  # the empty list (the stdlib corpus) is a param too: compare shows it when it differs
            assert run.data.params["data.corpus"] == "[]"
        key = {"data": "train_tokens", "pretrain": "val_loss", "sft": "exact_match_arithmetic",
               "reward": "val_accuracy", "rlhf": "rlhf_reward"}[stage]
        assert run.data.metrics[key] == pytest.approx(metrics[stage][key])
        if stage != "data":
            assert "resumed_from_step" not in run.data.metrics and run.data.tags["resumed_from_step"] == "0"
        names = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        contexts = {d.dataset.name: {t.value for t in d.tags} for d in run.inputs.dataset_inputs}
        if stage != "data":
            want = {"pretrain": "train.bin", "sft": "sft_train.jsonl", "reward": "pref_train.jsonl",
                    "rlhf": "prompts_train.jsonl"}[stage]
            from llmstages.stages.stage import DATA_FILES

            assert set(names) == set(DATA_FILES[stage])  # what the stage reads, not the whole data folder
            assert contexts[want] == {"train"} and contexts[want.replace("train", "val")] == {"eval"}
            from llmstages.lineage import file_md5

            assert names[want] == file_md5(work / "outputs/data" / want)[:8]
            (model,) = client.search_logged_models([exp.experiment_id],
                                                   filter_string=f"source_run_id = '{run.info.run_id}'")
            assert model.name == stage and model.tags["output_md5"] == run.data.tags["output_md5"]
            assert model.tags["local_path"] == f"outputs/{stage}"  # in the project: still right in a copy of it
            assert {a.path for a in client.list_logged_model_artifacts(model.model_id)} >= {"config.json",
                                                                                            "metrics.json"}
    versions = client.search_model_versions("name = 'llmstages-policy'")  # other tests' rlhf runs add theirs
    assert stage_runs["rlhf"].info.run_id in {v.run_id for v in versions}
    assert "dvc repro in the workspace" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["rlhf.algorithm"] == "ppo"
    assert parent.data.metrics["pretrain/val_loss"] == pytest.approx(metrics["pretrain"]["val_loss"])
    assert parent.data.metrics["sft/exact_match_arithmetic"] == pytest.approx(metrics["sft"]["exact_match_arithmetic"])
    assert parent.data.metrics["reward/val_accuracy"] == pytest.approx(metrics["reward"]["val_accuracy"])
    assert parent.data.metrics["rlhf/rlhf_kl_to_ref"] == pytest.approx(metrics["rlhf"]["rlhf_kl_to_ref"])


def test_a_copied_project_reads_and_writes_its_own_artifacts(tiny_run, tmp_path):
    """MLflow stores artifact locations as absolute paths; a stage run in a copy of the project re-points the
    copy's store at the copy's own artifact folder, so old and new runs resolve inside the copy and nothing is
    written to the original."""
    import shutil

    from mlflow.tracking import MlflowClient

    work, _ = tiny_run
    copy = tmp_path / "moved"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("checkpoints"))
    before = sorted(p for p in (work / "outputs/mlartifacts").rglob("*"))
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf"), "LLMSTAGES_PIPELINE_RUN": "moved"}
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run([str(BIN / "llmstages"), "pretrain", *TINY["pretrain"], "trainer.max_steps=2",
                        "out_dir=outputs/pre2"], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{copy}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("llmstages")
    assert exp.artifact_location == str(copy / "outputs/mlartifacts")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) > 5 and all(r.info.artifact_uri.startswith(f"{copy}/outputs/mlartifacts/") for r in runs)
    (new,) = [r for r in runs if r.data.tags.get("pipeline_run") == "moved" and r.data.tags.get("stage")]
    assert "metrics.json" in {a.path for a in client.list_artifacts(new.info.run_id)}
    old = next(r for r in runs if r.data.tags.get("stage") == "sft")
    assert "metrics.json" in {a.path for a in client.list_artifacts(old.info.run_id)}  # copied with the project
    assert sorted(p for p in (work / "outputs/mlartifacts").rglob("*")) == before


def test_every_training_stage_logs_its_probe_table(tiny_run):
    """probes.json per training stage: the same prompts; the reward model scores the SFT model's answers and
    the RLHF table carries the reward model's score of each policy answer."""
    from mlflow.tracking import MlflowClient

    work, _ = tiny_run
    client = MlflowClient(f"sqlite:///{work}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.pipeline_run = 'test-pipeline'", order_by=["attributes.start_time ASC"])
    first = {}
    for r in runs:
        if "stage" in r.data.tags:
            first.setdefault(r.data.tags["stage"], r.info.run_id)
    import yaml

    prompts = yaml.safe_load((ROOT / "conf/probes/default.yaml").read_text())["prompts"]
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        table = json.loads(open(client.download_artifacts(first[stage], "probes.json")).read())
        cols = table["columns"]
        assert cols == (["prompt", "response", "reward"] if stage in ("reward", "rlhf") else ["prompt", "response"])
        assert [row[0] for row in table["data"]] == prompts
        if "reward" in cols:
            assert all(isinstance(row[2], float) for row in table["data"])
    assert "probes.json" not in {a.path for a in client.list_artifacts(first["data"])}  # no model to ask


def test_wandb_offline_run_folder_config_and_group(tiny_run, tmp_path):
    """logger=wandb without an API key: an offline run in <wandb_dir>/wandb/ (nothing sent), whose records hold
    the group (pipeline run), the job type (stage), the config with the values used and the lineage, and the
    probe table; `wandb sync <that folder>` uploads it later."""
    from llmstages.lineage import combined_md5, tree_md5s

    work, _ = tiny_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(LLMSTAGES_CONF=str(ROOT / "conf"), LLMSTAGES_PIPELINE_RUN="wb-group")
    args = ["sft", f"init_from={work}/outputs/pretrain", f"data_dir={work}/outputs/data", "logger=wandb",
            "logger.wandb_dir=tracking", *TINY["sft"], "trainer.max_steps=2", "optim.lr=0.000777", "out_dir=outputs/s"]
    p = subprocess.run([str(BIN / "llmstages"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "tracking/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = p.stdout + p.stderr  # the run says where it is tracked
    assert "sft: tracked as W&B run sft-wb-group" in log and f"wandb sync tracking/wandb/{runs[0].name}" in log
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name) == ("wb-group", "sft", "sft-wb-group")
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") in ("run", "config")
              for u in (r.run.config.update if r.HasField("run") else r.config.update)}
    assert config["optim.lr"] == pytest.approx(0.000777) and config["trainer.max_steps"] == 2
    assert config["lineage/stage"] == "sft" and config["lineage/pipeline_run"] == "wb-group"
    out = tmp_path / "outputs/s"
    assert config["lineage/output_md5"] == combined_md5(tree_md5s([out]), out)
    table = json.loads(next((runs[0] / "files/media/table").glob("probes_*.table.json")).read_text())
    import yaml

    prompts = yaml.safe_load((ROOT / "conf/probes/default.yaml").read_text())["prompts"]
    assert table["columns"] == ["prompt", "response"] and [row[0] for row in table["data"]] == prompts


def test_compare_lineage_traces_each_row_to_its_run(tiny_run):
    """`llmstages compare --lineage`: each row's metric is the stage's metrics.json value, and its commit, input
    hash and upstream run are those the run logged (inputs_md5 recomputed from the per-file MD5s it recorded)."""
    import csv
    import io

    from mlflow.tracking import MlflowClient

    from llmstages.cli import main
    from llmstages.lineage import combined_md5

    work, metrics = tiny_run
    uri = f"sqlite:///{work}/outputs/mlflow.db"
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["compare", "--tracking-uri", uri, "--tag", "pipeline_run=test-pipeline", "--stage", "sft",
                     "--lineage", "--format", "csv", "--metric", "exact_match", "--last", "1"]) == 0
    [row] = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert float(row["exact_match"]) == pytest.approx(metrics["sft"]["exact_match"], abs=1e-6)
    client = MlflowClient(uri)
    run = client.get_run(row["run_id"])
    lineage = json.loads(open(client.download_artifacts(row["run_id"], "lineage.json")).read())
    assert row["git_commit"] == run.data.tags["git_commit"] and row["git_dirty"] == run.data.tags["git_dirty"] \
        == ("unknown" if row["git_commit"] == "unknown" else row["git_dirty"]) in ("True", "False", "unknown")
    assert row["inputs_md5"] == combined_md5(lineage["inputs"]) == run.data.tags["inputs_md5"]
    upstream = {client.get_run(i).data.tags["stage"] for i in row["upstream_run_id"].split(",")}
    assert upstream == {"data", "pretrain"}
