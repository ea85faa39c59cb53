"""The `llmstages` command as a user runs it: help, a Hydra multirun, kill-and-resume, generate, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY

LLMSTAGES = str(Path(sys.executable).parent / "llmstages")


def run(args: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    p = subprocess.run([LLMSTAGES, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check:
        assert p.returncode == 0, f"llmstages {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_help_lists_stages_and_is_fast(tmp_path):
    t = time.perf_counter()
    p = run(["--help"], tmp_path)
    assert time.perf_counter() - t < 10  # generous bound; the figure itself lives in benchmarks/
    for word in ("data", "pretrain", "sft", "reward", "rlhf", "generate", "dvc repro"):
        assert word in p.stdout


@pytest.mark.parametrize("stage", ["data", "pretrain", "sft", "reward", "rlhf"])
def test_stage_help_says_what_the_stage_does(tmp_path, stage):
    """`llmstages <stage> --help` opens with the stage: what it does, what it reads and writes, its main settings,
    then Hydra's config groups and the composed config (whose keys the main settings name)."""
    out = run([stage, "--help"], tmp_path).stdout
    assert out.startswith(f"llmstages {stage}: ") and "powered by Hydra" not in out
    settings = next(line for line in out.splitlines() if "Main settings:" in line)
    config = out.split("== The composed config ==")[1]
    for key in settings.split("Main settings:")[1].strip(" .").split(", "):
        name = key.split("=")[0].strip(" .").split(" ")[0]
        assert f"\n{name.split('.')[-1]}:" in config or f" {name.split('.')[-1]}:" in config, name
    assert "Reads " in out and "writes" in out


def test_unknown_command_fails(tmp_path):
    p = run(["pretrian"], tmp_path, check=False)
    assert p.returncode == 2 and "unknown command 'pretrian'; did you mean 'pretrain'?" in p.stderr
    from importlib.metadata import version

    assert run(["--version"], tmp_path).stdout == f"llmstages {version('llmstages')}\n"


def test_bad_override_names_the_key(tmp_path):
    p = run(["pretrain", "trainer.max_stepz=5"], tmp_path, check=False)
    assert p.returncode != 0 and "max_stepz" in p.stderr


def test_stage_prefix_is_optional_in_overrides():
    from llmstages.cli import strip_stage_prefix

    assert strip_stage_prefix("rlhf", "rlhf.algorithm=dpo") == "algorithm=dpo"
    assert strip_stage_prefix("rlhf", "+rlhf.x=1") == "+x=1" and strip_stage_prefix("rlhf", "~rlhf.x") == "~x"
    assert strip_stage_prefix("rlhf", "algorithm=dpo") == "algorithm=dpo"
    assert strip_stage_prefix("sft", "rlhf.algorithm=dpo") == "rlhf.algorithm=dpo"  # another stage's key: untouched
    # the data stage has a section named `data`: `data.corpus` is that section's key, `data.data.corpus` the same
    assert strip_stage_prefix("data", "data.corpus=[a]") == "data.corpus=[a]"
    assert strip_stage_prefix("data", "data.data.corpus=[a]") == "data.corpus=[a]"
    assert strip_stage_prefix("data", "data.vocab_size=300") == "vocab_size=300"
    assert strip_stage_prefix("data", "data.sft.columns={prompt: q}") == "data.sft.columns={prompt: q}"


def test_data_stage_own_data_from_the_command_line(tmp_path):
    """The README's form: `llmstages data data.corpus=... data.sft.path=...`, through the real CLI."""
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document {i} about foxes and dogs. " * 20)
    rows = [{"question": f"Say {i}.", "answer": str(i)} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(["data", "data.corpus=[docs/]", "data.sft.path=qa.jsonl", "data.sft.columns={prompt: question, "
         "completion: answer}", "vocab_size=300", "data.arithmetic_max=3", "out_dir=out", "logger=none"], tmp_path)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (m["corpus_docs"], m["sft_rows_kept"]) == (6, 8) and m["vocab_size"] <= 300


def test_unknown_rlhf_algorithm_is_a_one_line_error(tmp_path):
    p = run(["rlhf", "rlhf.algorithm=reinforce", "logger=none"], tmp_path, check=False)
    assert p.returncode != 0 and "rlhf.algorithm" in p.stderr and "reinforce" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_upstream_output_is_a_clear_error(tmp_path):
    p = run(["sft", "init_from=nowhere", *TINY["sft"], "logger=none"], tmp_path, check=False)
    assert p.returncode != 0 and "nowhere" in p.stderr


def test_bad_folders_are_one_line_errors_before_training(tiny_run, tmp_path):
    """An output folder that cannot be made, and a data_dir that is another stage's output, stop the stage before
    it trains, with the path at fault named."""
    work, _ = tiny_run
    (tmp_path / "afile").write_text("x")
    base = [*TINY["pretrain"], "logger=none", "trainer.max_steps=2"]
    p = run(["pretrain", f"data_dir={work}/outputs/data", f"out_dir={tmp_path}/afile/pt", *base], tmp_path,
            check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "Epoch" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        f"llmstages pretrain: output folder {tmp_path}/afile/pt cannot be made: {tmp_path}/afile is not a folder"
    p = run(["pretrain", f"data_dir={work}/outputs/sft", "out_dir=outputs/pt", *base], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"llmstages pretrain: error: {work}/outputs/sft/meta.json has no vocab_size, val_tokens, val_bytes, "
        f"unigram_entropy_nats: data_dir={work}/outputs/sft is not a data stage output (it is the sft stage's)")
    p = run(["pretrain", f"data_dir={tmp_path}", "out_dir=outputs/pt", *base], tmp_path, check=False)
    assert p.returncode == 1 and f"{tmp_path}/meta.json not found: data_dir={tmp_path} should be" in p.stderr
    assert not (tmp_path / "outputs/pt").exists()
    # The output folder is the stage's input: refused before anything is written there.
    shutil.copytree(work / "outputs/data", tmp_path / "data")
    before = {f.name: f.read_bytes() for f in (tmp_path / "data").iterdir()}
    p = run(["pretrain", f"data_dir={tmp_path}/data", f"out_dir={tmp_path}/data", *base], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"llmstages pretrain: error: out_dir={tmp_path}/data is or holds this stage's input {tmp_path}/data: "
        "writing the output there would overwrite it; choose another folder")
    assert {f.name: f.read_bytes() for f in (tmp_path / "data").iterdir()} == before
    p = run(["pretrain", "trainer.strategy=nonsense", *base], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].endswith(
        "pretrain.trainer.strategy: 'nonsense' is not a Lightning strategy; expected auto, ddp, fsdp, deepspeed, ... "
        "(Lightning's StrategyRegistry has them all)")


def test_log_lines_come_above_a_live_progress_bar_not_into_it():
    """In a terminal, Rich's live bar replaces sys.stdout with a proxy that prints each line above the bar; a
    console handler made before (as Hydra's is) still writes through it once the CLI has routed the logs."""
    import io
    import logging
    import re

    from rich.console import Console
    from rich.progress import Progress

    from llmstages.cli import _route_lightning_logs

    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    try:
        _route_lightning_logs()
        screen = io.StringIO()
        with Progress(console=Console(file=screen, force_terminal=True, width=60)) as progress:
            progress.add_task("pretrain", total=10, completed=3)
            progress.refresh()
            logging.getLogger("llmstages_test_console").warning("a line logged while the bar is drawn")
            progress.refresh()
    finally:
        logging.getLogger().removeHandler(handler)
    lines = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.getvalue()).replace("\r", "\n").splitlines()
    assert "a line logged while the bar is drawn" in lines  # a line of its own, not glued to the bar


def test_multirun_sft_two_jobs_in_two_folders(tiny_run, tmp_path):
    work, _ = tiny_run
    args = ["sft", "-m", "optim.lr=1e-4,3e-4", f"init_from={work}/outputs/pretrain", f"data_dir={work}/outputs/data",
            "logger=csv", *TINY["sft"], "trainer.max_steps=4"]
    p = run(args, tmp_path)
    out = p.stdout + p.stderr
    assert out.count("GPU available") == 2, out  # once per job: Lightning's lines are not doubled under Hydra
    assert "💡" not in out  # nor its cloud-product tips
    jobs = sorted((tmp_path / "outputs/multirun/sft").glob("*/*/metrics.json"))
    assert len(jobs) == 2
    lrs = sorted(yaml.safe_load((j.parent / "config.yaml").read_text())["optim"]["lr"] for j in jobs)
    assert lrs == [1e-4, 3e-4]


def test_diverged_pretrain_is_a_one_line_error(tiny_run, tmp_path):
    work, _ = tiny_run
    p = run(["pretrain", f"data_dir={work}/outputs/data", "out_dir=outputs/div", "logger=none", *TINY["pretrain"],
             "optim.lr=50", "trainer.max_steps=10", "trainer.val_check_interval=10"], tmp_path, check=False)
    assert p.returncode == 1 and "pretrain diverged: val_loss=" in p.stderr and "optim.lr=50" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "outputs/div/model.safetensors").exists()


@pytest.mark.parametrize("stage, args, key", [
    ("sft", ["max_len=1024"], "sft.max_len=1024"),
    ("reward", ["max_len=1024"], "reward.max_len=1024"),
    ("rlhf", ["algorithm=dpo", "dpo.max_len=1024"], "rlhf.dpo.max_len=1024"),
    ("rlhf", ["ppo.max_new_tokens=2000"], "rlhf.ppo.max_new_tokens=2000"),
])
def test_length_above_the_model_positions_is_a_one_line_error_before_training(tiny_run, tmp_path, stage, args, key):
    """A length longer than the model's positions is refused, naming the key, before any training step."""
    work, _ = tiny_run
    inputs = {"sft": [f"init_from={work}/outputs/pretrain"], "reward": [f"init_from={work}/outputs/sft"],
              "rlhf": [f"policy_from={work}/outputs/sft", f"reward_from={work}/outputs/reward"]}[stage]
    p = run([stage, f"data_dir={work}/outputs/data", *inputs, "out_dir=outputs/o", "logger=none",
             *TINY[stage], *args], tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llmstages {stage}: error: {key} is longer than the ") and "positions of the model" in last
    assert not (tmp_path / "outputs/checkpoints").exists()  # stopped before the Trainer made a checkpoint folder


def test_generate_shows_each_stage(tiny_run):
    work, _ = tiny_run
    p = run(["generate", "What's 2 + 2?", "--max-new-tokens", "4"], work)
    for stage in ("pretrain", "sft", "rlhf"):
        assert f"outputs/{stage}" in p.stdout
    assert p.stdout.count("What's 2 + 2?") == 3
    p = run(["generate", "hi", "--model", "outputs/reward"], work, check=False)  # it scores, it does not write
    assert p.returncode != 0 and "outputs/reward is a reward model" in p.stderr and "Traceback" not in p.stderr
    long = "What is 2 + 2? " * 300  # longer than the context: a one-line error, not a traceback from the model
    p = run(["generate", long, "--model", "outputs/sft"], work, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith(
        "llmstages generate: the prompt 'What is 2 + 2? What is 2 + 2? What is 2 ...' is 2703 tokens")
    assert "tokens in the chat template; outputs/sft's context holds" in p.stderr
    p = run(["generate", "hi", "--model", "outputs/sft", "--max-new-tokens", "100000"], work, check=False)
    assert p.returncode == 1 and "--max-new-tokens 100000 leaves no room for a prompt" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: -1 is out of range: expected >= 1"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: 'x' is not an integer"),
    (["--top-p", "0"], "argument --top-p: 0 is out of range: expected (0, 1]"),
    (["--temperature", "-0.5"], "argument --temperature: -0.5 is out of range: expected >= 0"),
    (["--top-k", "-2"], "argument --top-k: -2 is out of range: expected >= 0"),
])
def test_generate_refuses_bad_sampling_values(tmp_path, args, message):
    p = run(["generate", "hi", *args], tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip().endswith(message) and "Traceback" not in p.stderr


def test_generate_says_a_model_folder_is_not_a_prompt(tiny_run):
    """``llmstages generate outputs/rlhf "..."`` (the model as ``chat`` takes it) used to answer the path as a
    prompt; it names the option instead."""
    work, _ = tiny_run
    p = run(["generate", "outputs/rlhf", "What's 2 + 2?"], work, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "llmstages generate: 'outputs/rlhf' is a model folder, not a prompt; pass it as --model outputs/rlhf")


def test_kill_and_resume(tiny_run, tmp_path):
    """A pretrain killed mid-run and started again resumes from its last checkpoint, finishes the steps, and
    continues the same tracking runs: one MLflow run with the loss curve from both halves, one W&B run id."""
    import mlflow

    work, _ = tiny_run
    args = ["pretrain", f"data_dir={work}/outputs/data", "out_dir=outputs/pt", "logger=many", "model=tiny",
            "batch_size=8", "seq_len=64", "trainer.max_steps=300", "trainer.val_check_interval=300",
            "trainer.checkpoint_every_n_steps=20", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
            "trainer.precision=32-true", "probes.max_new_tokens=4"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(LLMSTAGES_CONF=str(ROOT / "conf"), LLMSTAGES_PIPELINE_RUN="resume-test")
    proc = subprocess.Popen([LLMSTAGES, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    ckpts = tmp_path / "outputs/checkpoints"
    while time.time() < deadline and not list(ckpts.glob("pretrain-*/last.ckpt")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("pretrain-*/last.ckpt")), "no checkpoint was written before the kill"
    assert not (tmp_path / "outputs/pt/metrics.json").exists()
    p = subprocess.run([LLMSTAGES, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs/pt/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 20 and metrics["steps"] == 300
    assert "resuming from" in p.stdout + p.stderr
    assert not list(ckpts.glob("pretrain-*"))  # cleaned up after success

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/lm_loss")]
    assert min(steps) < metrics["resumed_from_step"] < max(steps)  # one curve across the kill
    assert runs[0].data.metrics["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    # The resumed run trained on the same batches as an uninterrupted one: same final loss.
    straight = [a.replace("out_dir=outputs/pt", "out_dir=outputs/pt_straight").replace("logger=many", "logger=none")
                for a in args]
    run(straight, tmp_path, timeout=900)
    ref = json.loads((tmp_path / "outputs/pt_straight/metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
    assert metrics["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3)  # replaying seen batches: ~8% off
    wandb_runs = sorted((tmp_path / "outputs/wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in wandb_runs}) == 1  # same run id
    # Probe prompts: a table artifact in MLflow, with the pretrained model's continuation of each prompt.
    probes = json.loads(open(client.download_artifacts(runs[0].info.run_id, "probes.json")).read())
    assert probes["columns"] == ["prompt", "response"]
    prompts = yaml.safe_load((ROOT / "conf/probes/default.yaml").read_text())["prompts"]
    assert [row[0] for row in probes["data"]] == prompts and prompts[:3] == [
        "The capital of France is", "What's 2 + 2?", "Explain gravity to a 5-year-old."]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_says_what_a_rerun_does_and_leaves_no_mlflow_process(tiny_run, tmp_path, sig):
    """Ctrl-C (or SIGTERM) before the first checkpoint: the stage says so in its last line and exits 130 (143;
    Lightning's own stops exit 1 without a word, and 0 for SIGTERM), says that the same command starts again from step 0
    (one checkpoint every N steps), its MLflow run is FAILED, and its MLflow process (llmstages.mlflow_process,
    in a session of its own, so the terminal's Ctrl-C does not reach it) ends with it."""
    import mlflow

    work, _ = tiny_run
    args = ["pretrain", f"data_dir={work}/outputs/data", "out_dir=outputs/pt", "model=tiny", "batch_size=8",
            "seq_len=64", "trainer.max_steps=5000", "trainer.checkpoint_every_n_steps=1000",
            "trainer.enable_progress_bar=false", "trainer.precision=32-true"]
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([LLMSTAGES, *args], cwd=tmp_path, env=env, stdout=err, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "tracked as MLflow run" not in (tmp_path / "stderr.txt").read_text() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # into the training steps
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 128 + sig
    log = (tmp_path / "stderr.txt").read_text()
    assert log.strip().splitlines()[-1] == ("llmstages pretrain: interrupted" if sig == signal.SIGINT else
                                            "llmstages pretrain: stopped by SIGTERM")
    assert "pretrain: stopped. No checkpoint was written yet (one every 1000 steps): the same command starts " \
           "again from step 0." in log, log[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'")
    assert run_.info.status == "FAILED"
    deadline = time.time() + 15
    while time.time() < deadline and (left := [c for c in Path("/proc").glob("[0-9]*/cmdline") if _reads(c, tmp_path)]):
        time.sleep(0.2)
    assert not left, "an llmstages.mlflow_process of this run outlived it"


def test_tracking_store_errors_are_one_line_naming_the_key(tiny_run, tmp_path):
    """A tracking URI MLflow refuses stops the stage with one line naming logger.mlflow_tracking_uri (not the
    MLflow process's traceback); an empty one is refused before anything runs (MLflow would make ./mlflow.db)."""
    work, _ = tiny_run
    base = ["reward", f"init_from={work}/outputs/sft", f"data_dir={work}/outputs/data", *TINY["reward"],
            "trainer.max_steps=2", "out_dir=outputs/rw"]
    p = run([*base, "logger.mlflow_tracking_uri=bogus://nowhere"], tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("llmstages reward: MLflow error (logger.mlflow_tracking_uri): ")
    assert "bogus://nowhere" in last and "Traceback" not in p.stderr
    p = run([*base, "logger.mlflow_tracking_uri="], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].endswith(
        "logger.mlflow_tracking_uri: expected a tracking URI such as sqlite:///outputs/mlflow.db, got ''")
    assert not (tmp_path / "mlflow.db").exists()
    p = run([*base, "logger.mlflow_tracking_uri=sqlite:////proc/nope/mlflow.db"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(
        "llmstages reward: error: logger.mlflow_tracking_uri=sqlite:////proc/nope/mlflow.db: cannot make its "
        "folder /proc/nope: ")


def _reads(cmdline: Path, where: Path) -> bool:
    """Whether the process of ``/proc/<pid>/cmdline`` is an MLflow process for a store under ``where``."""
    try:
        text = cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "llmstages.mlflow_process" in text and str(where) in text


@pytest.mark.parametrize("both", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_stage_goes_on_when_the_reader_of_its_output_goes_away(tiny_run, tmp_path, both):
    """``llmstages reward ... | head -2`` (and ``2>&1 | head -2``): once the reader has gone, writes would raise
    BrokenPipeError (log lines, and Rich's progress bar and metrics table, whose default exits with 1 and loses
    the stage's work). The stage goes on without printing: exit 0, its output written, its MLflow run FINISHED."""
    import mlflow

    work, _ = tiny_run
    args = ["reward", f"init_from={work}/outputs/sft", f"data_dir={work}/outputs/data", *TINY["reward"],
            "trainer.max_steps=2", "trainer.enable_progress_bar=true", "out_dir=outputs/rw"]
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen([LLMSTAGES, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT if both else err)
        p.stdout.close()  # the reader goes away before the first line
        assert p.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "BrokenPipeError" not in stderr and "Logging error" not in stderr
    assert json.loads((tmp_path / "outputs/rw/metrics.json").read_text())["val_pairs"] > 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'reward'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_wandb_offline_run(tiny_run, tmp_path):
    """logger=wandb with no API key logs offline into outputs/wandb, grouped by the pipeline run."""
    work, _ = tiny_run
    env_extra = {"WANDB_API_KEY": "", "LLMSTAGES_PIPELINE_RUN": "wb-group"}
    args = ["reward", f"init_from={work}/outputs/sft", f"data_dir={work}/outputs/data", "logger=wandb",
            *TINY["reward"], "trainer.max_steps=2", "out_dir=outputs/rw"]
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf"), **env_extra}
    env.pop("WANDB_API_KEY")
    p = subprocess.run([LLMSTAGES, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "outputs/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run file (protobuf records) holds the run's group, job type and config.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needle in (b"wb-group", b"reward", b"trainer.max_steps", b"val_accuracy"):
        assert needle in record


def test_params_mode_refuses_overrides_and_says_where_they_go(tmp_path):
    """``--params FILE`` trains with FILE's section as written: an override after it is refused (exit 2) with
    the two places an override does go, before anything is read or written."""
    p = run(["sft", "--params", "params.yaml", "sft.optim.lr=1"], tmp_path, check=False)
    assert p.returncode == 2
    assert ("--params params.yaml takes no overrides, got: sft.optim.lr=1. Edit the 'sft' section of params.yaml, "
            "or compose from conf/ with the overrides: llmstages sft optim.lr=1 (or, in a DVC project: "
            "dvc exp run -S 'sft.optim.lr=1')") in p.stderr
    assert not list(tmp_path.iterdir())


def test_a_refused_run_folder_says_why(tmp_path):
    """A run that Hydra started and the stage refused (a bad value) exits 1 with one line naming the key, and
    the run folder Hydra made keeps that line in its ``<stage>.log`` instead of an empty log."""
    p = run(["sft", "trainer.max_steps=-1"], tmp_path, check=False)
    assert p.returncode == 1
    message = "llmstages sft: config (conf/ + command-line overrides): sft.trainer.max_steps: must be > 0, got -1"
    assert p.stderr.strip().splitlines()[-1] == message
    (log,) = (tmp_path / "outputs/runs/sft").glob("*/sft.log")
    assert log.read_text().strip().endswith("[llmstages][ERROR] - " + message)


def test_misspelled_override_is_named_before_hydra_runs(tmp_path):
    """A command-line ``key=value`` whose key is not in the stage's config stops with the key and the closest
    known one (Hydra's own message would suggest appending it with ``+``), before a run folder is made; a wrong
    value of a known key names that key and suggests nothing."""
    p = run(["sft", "trainer.max_stepz=5"], tmp_path, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == ("llmstages sft: command-line override 'trainer.max_stepz=5': no key "
                                                 "'trainer.max_stepz' in the sft config; did you mean "
                                                 "'trainer.max_steps'?")
    assert not list(tmp_path.iterdir())  # no outputs/runs/... folder left behind
    p = run(["sft", "trainer.max_steps=five"], tmp_path, check=False)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert "invalid sft config at key 'trainer.max_steps'" in last and "did you mean" not in last
