"""The MLflow process (llmstages.mlflow_process): a stage's MLflow client lives in a process of its own, which
follows the stage's working directory and environment, sends MLflow's errors back, and leaves the stage
process free of MLflow's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY

TESTS = str(Path(__file__).resolve().parent)


def folder_and_env(client, name: str) -> tuple[str, str | None, int]:
    """(working directory, ``$name``, pid) of the MLflow process."""
    return os.getcwd(), os.environ.get(name), os.getpid()


def fail_with(client, kind: str) -> None:
    if kind == "value":
        raise ValueError("a value at fault")
    client.get_run("no-such-run")  # MLflow's own error: a run that does not exist


@pytest.fixture
def process_for_tests(monkeypatch):
    """The MLflow process started anew with this folder importable, so that it can run this module's
    functions; stopped again afterwards (the next call starts a fresh one)."""
    from llmstages import mlflow_process

    mlflow_process.stop()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (TESTS, os.environ.get("PYTHONPATH")))))
    mlflow_process.start()
    yield mlflow_process
    mlflow_process.stop()


def test_calls_run_in_the_callers_folder_and_environment(process_for_tests, tmp_path, monkeypatch):
    call = process_for_tests.call
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMSTAGES_PROBE", "one")
    where, value, pid = call(uri, folder_and_env, "LLMSTAGES_PROBE")
    assert (where, value) == (str(tmp_path), "one") and pid != os.getpid()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setenv("LLMSTAGES_PROBE", "two")
    assert call(uri, folder_and_env, "LLMSTAGES_PROBE") == (str(tmp_path / "sub"), "two", pid)
    monkeypatch.delenv("LLMSTAGES_PROBE")
    assert call(uri, folder_and_env, "LLMSTAGES_PROBE")[1] is None
    assert (tmp_path / "mlflow.db").is_file()  # the store was opened at the absolute location


def test_errors_come_back_a_builtin_one_as_itself(process_for_tests, tmp_path):
    call, uri = process_for_tests.call, f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="a value at fault"):
        call(uri, fail_with, "value")
    with pytest.raises(process_for_tests.MlflowProcessError, match="MlflowException.*no-such-run") as err:
        call(uri, fail_with, "mlflow")
    assert "\n" not in str(err.value) and str(err.value).endswith(f"(tracking URI {uri})")
    assert "Traceback" in err.value.details
    assert call(uri, folder_and_env, "HOME")[1] == os.environ.get("HOME")  # still serving after both


def test_a_posted_call_runs_in_order_and_its_failure_is_a_warning(capfd, process_for_tests, tmp_path):
    """post() does not wait; what it sends runs before a later call(). A posted call that fails (the metrics of
    a training step, say, on a locked store) writes one warning line and the stage goes on."""
    from llmstages.tracking import _set_tag

    mp, uri = process_for_tests, f"sqlite:///{tmp_path}/mlflow.db"
    mp.stop()
    mp.start()  # its stderr: the one capfd reads
    run_id = mp.call(uri, make_run)
    mp.post(uri, _set_tag, run_id, "posted", "yes")
    assert mp.call(uri, tags_of, run_id)["posted"] == "yes"
    mp.post(uri, fail_with, "mlflow")
    mp.post(uri, _set_tag, run_id, "after", "yes")  # runs after the failed one
    assert mp.call(uri, tags_of, run_id)["after"] == "yes"
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if "warning: MLflow" in ln]
    assert line.startswith("llmstages: warning: MLflow failed in fail_with (the stage goes on without what it "
                           "logged): MlflowException:") and line.endswith(f"(tracking URI {uri})")


def test_a_call_interrupted_before_its_answer_leaves_none_for_the_next(process_for_tests, tmp_path):
    """Ctrl-C while the stage waits for an answer: the answer comes later, and the next call must not take it
    for its own."""
    import signal
    import threading

    mp, uri = process_for_tests, f"sqlite:///{tmp_path}/mlflow.db"
    threading.Timer(0.5, signal.raise_signal, (signal.SIGINT,)).start()
    with pytest.raises(KeyboardInterrupt):
        mp.call(uri, sleep_then, 1.5, "slow")
    assert mp.call(uri, sleep_then, 0.0, "next") == "next"


def sleep_then(client, seconds: float, value: str) -> str:
    import time

    time.sleep(seconds)
    return value


def make_run(client) -> str:
    return client.create_run(client.create_experiment("posted")).info.run_id


def tags_of(client, run_id: str) -> dict[str, str]:
    return dict(client.get_run(run_id).data.tags)


def test_the_mlflow_logger_logs_as_lightnings_does(tmp_path, monkeypatch):
    """Parameters cut to 250 characters, metric names stripped of characters MLflow refuses, a string value
    dropped, a point without a step at step 0, and the run ends FINISHED."""
    import mlflow

    from llmstages.tracking import make_loggers

    monkeypatch.chdir(tmp_path)
    (lg,) = make_loggers(["mlflow"], stage="sft", run_name="sft-x", tags={"stage": "sft", "git_commit": "unknown"},
                         experiment="exp", mlflow_tracking_uri="sqlite:///outputs/mlflow.db",
                         mlflow_artifact_location="outputs/mlartifacts", wandb_project="p", wandb_mode=None,
                         wandb_dir="outputs", csv_dir="outputs/csv")
    lg.log_hyperparams({"optim": {"lr": 0.001}, "long": "x" * 300})
    lg.log_metrics({"val/loss(ema)": 1.5, "note": "text"})
    lg.log_metrics({"val/loss(ema)": 1.25}, step=7)
    lg.finalize("success")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    run = client.get_run(lg.run_id)
    assert run.data.params["optim/lr"] == "0.001" and run.data.params["long"] == "x" * 250
    assert [(m.step, m.value) for m in client.get_metric_history(lg.run_id, "val/lossema")] == [(0, 1.5), (7, 1.25)]
    assert "note" not in run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == "sft-x"
    assert client.get_experiment(run.info.experiment_id).name == "exp"


def test_a_stage_process_never_imports_mlflow_and_its_run_is_complete(tiny_run, tmp_path):
    """A stage run as a user runs it tracks to MLflow through the MLflow process: the stage's own process loads
    no MLflow module, and the run holds its parameters, curves, summary and artifacts, FINISHED."""
    import mlflow

    work, _ = tiny_run
    args = ["reward", f"init_from={work}/outputs/sft", f"data_dir={work}/outputs/data", *TINY["reward"],
            "trainer.max_steps=2", "out_dir=outputs/rw"]
    code = ("import json, sys\nfrom llmstages.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'mlflow': sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')}))")
    env = {**os.environ, "LLMSTAGES_CONF": str(ROOT / "conf")}
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "mlflow": []}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'reward'")
    metrics = json.loads((tmp_path / "outputs/rw/metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "2"
    assert run.data.metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    curve = client.get_metric_history(run.info.run_id, "val/bt_loss")  # the curve of the final validation
    assert curve[-1].value == pytest.approx(metrics["val_loss"], abs=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "config.yaml",
                                                                        "lineage.json"}
