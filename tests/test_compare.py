"""`llmstages compare` against a real MLflow sqlite store: differing params, exact metrics, filters, formats, plot."""

from __future__ import annotations

import csv
import io

import pytest

from llmstages.cli import main

T0 = 1_800_000_000_000  # start times (ms), one minute apart, so "newest first" is well defined
SAME = {"seed": "1234", "batch_size": "16", "model.d_model": "256"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment `llmstages`: pretrain runs at three learning rates, a failed pretrain run, an sft run;
    experiment `other`: one pretrain run. Returns the tracking URI and ``{run name: (run id, final metrics)}``."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exps = {name: client.create_experiment(name, artifact_location=str(root / "art" / name))
            for name in ("llmstages", "other")}
    runs = {}

    def add(i, name, exp, stage, params, final, curve=None, status="FINISHED", pipeline="p1"):
        tags = {"stage": stage, "pipeline_run": pipeline, "git_commit": "abc", "git_dirty": "False"}
        run = client.create_run(exps[exp], start_time=T0 + i * 60_000, run_name=name, tags=tags)
        rid = run.info.run_id
        metrics = [Metric(k, v, T0, 0) for k, v in final.items()]
        metrics += [Metric("train/lm_loss", v, T0 + s, s * 10) for s, v in enumerate(curve or [])]
        client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("mlflow.source.type", "LOCAL")])
        client.set_terminated(rid, RunStatus.to_string(getattr(RunStatus, status)), end_time=T0 + i * 60_000 + 1)
        runs[name] = (rid, final)

    # Awkward floats on purpose: the CSV must carry them exactly, not rounded.
    add(0, "pretrain-a", "llmstages", "pretrain", {**SAME, "optim.lr": "0.001"},
        {"val_loss": 2.718281828459045, "train_tokens": 123456789.0}, [4.0, 3.1, 2.9, 2.8, 2.75])
    add(1, "pretrain-b", "llmstages", "pretrain", {**SAME, "optim.lr": "0.003"},
        {"val_loss": 0.30000000000000004, "train_tokens": 123456789.0}, [4.0, 2.6, 2.2, 2.0, 1.9], pipeline="p2")
    add(2, "pretrain-c", "llmstages", "pretrain", {**SAME, "optim.lr": "0.01"},
        {"val_loss": 1.0 / 3.0, "train_tokens": 123456789.0}, [4.0, 3.5, 3.6, 3.4, 3.3], pipeline="p2")
    add(3, "pretrain-failed", "llmstages", "pretrain", {**SAME, "optim.lr": "0.1"}, {}, [4.0, 9.0], status="FAILED")
    add(4, "sft-a", "llmstages", "sft", {**SAME, "optim.lr": "0.0001"}, {"exact_match_arithmetic": 0.3881})
    add(5, "pretrain-other", "other", "pretrain", {**SAME, "optim.lr": "0.0005"}, {"val_loss": 3.25})
    return uri, runs


def run_csv(capsys, uri, *args) -> tuple[list[dict], str]:
    assert main(["compare", "--tracking-uri", uri, "--format", "csv", *args]) == 0
    out = capsys.readouterr()
    return list(csv.DictReader(io.StringIO(out.out))), out.err


def test_csv_shows_only_differing_params_and_exact_metrics(store, capsys):
    uri, runs = store
    rows, err = run_csv(capsys, uri, "--stage", "pretrain", "--experiment", "llmstages")
    assert list(rows[0]) == ["run", "run_id", "stage", "start", "optim.lr", "val_loss"]
    assert [r["run"] for r in rows] == ["pretrain-c", "pretrain-b", "pretrain-a"]  # newest first
    assert "3 params identical across the 3 runs" in err
    for r in rows:
        rid, final = runs[r["run"]]
        assert r["run_id"] == rid and r["stage"] == "pretrain"
        assert float(r["val_loss"]) == final["val_loss"]  # bit-exact round trip
    assert {r["optim.lr"] for r in rows} == {"0.001", "0.003", "0.01"}
    rows, _ = run_csv(capsys, uri, "--stage", "pretrain", "--experiment", "llmstages", "--metric", "train_tokens",
                      "--metric", "train/lm_loss")
    assert [r["train_tokens"] for r in rows] == ["123456789.0"] * 3
    assert [float(r["train/lm_loss"]) for r in rows] == [3.3, 1.9, 2.75]  # latest point of the curve


def test_filters(store, capsys):
    uri, runs = store
    names = lambda *a: [r["run"] for r in run_csv(capsys, uri, *a)[0]]  # noqa: E731
    assert names() == ["pretrain-other", "sft-a", "pretrain-c", "pretrain-b", "pretrain-a"]  # all experiments
    assert names("--stage", "sft") == ["sft-a"]
    assert names("--experiment", "other") == ["pretrain-other"]
    assert names("--tag", "pipeline_run=p2") == ["pretrain-c", "pretrain-b"]
    assert names("--tag", "pipeline_run=p1", "--stage", "pretrain", "--experiment", "llmstages") == ["pretrain-a"]
    assert names("--stage", "pretrain", "--last", "2") == ["pretrain-other", "pretrain-c"]
    assert names("--status", "failed") == ["pretrain-failed"]
    rows, _ = run_csv(capsys, uri, "--all-status", "--experiment", "llmstages", "--stage", "pretrain")
    assert {r["run"]: r["status"] for r in rows} == {"pretrain-failed": "FAILED", "pretrain-c": "FINISHED",
                                                   "pretrain-b": "FINISHED", "pretrain-a": "FINISHED"}
    assert rows[0]["val_loss"] == ""  # the failed run has no final metric


def test_default_and_all_metrics(store, capsys):
    uri, _ = store
    rows, _ = run_csv(capsys, uri, "--experiment", "llmstages")  # pretrain + sft defaults
    assert list(rows[0])[-2:] == ["val_loss", "exact_match_arithmetic"]
    rows, _ = run_csv(capsys, uri, "--experiment", "llmstages", "--metric", "all")
    assert list(rows[0])[-3:] == ["exact_match_arithmetic", "train_tokens", "val_loss"]


def test_markdown_table(store, capsys):
    uri, runs = store
    assert main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | run_id | stage | start | optim.lr | val_loss |"
    assert lines[1] == "|---|---|---|---|---|---:|"
    assert len(lines) == 2 + 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert all(line.count(" | ") == 5 for line in lines[2:])
    row = dict(zip(["run", "id", "stage", "start", "lr", "val_loss"], lines[3].strip("| ").split(" | ")))
    assert row == {**row, "run": "pretrain-c", "id": runs["pretrain-c"][0], "lr": "0.01", "val_loss": "0.3333"}


def test_rich_table_and_output_file(store, capsys, tmp_path):
    uri, _ = store
    assert main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--experiment", "llmstages"]) == 0
    out = capsys.readouterr().out
    assert "pretrain-a" in out and "optim.lr" in out and "0.3333" in out and "3 params identical" in out
    assert "seed" not in out
    dest = tmp_path / "cmp.csv"
    assert main(["compare", "--tracking-uri", uri, "--format", "csv", "--output", str(dest)]) == 0
    assert capsys.readouterr().out == "" and len(list(csv.DictReader(dest.open()))) == 5


def test_plot(store, capsys, tmp_path):
    from PIL import Image

    from llmstages.compare import differing_params, find_runs, open_store, plot_metrics

    uri, _ = store
    png = tmp_path / "curves.png"
    assert main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--experiment", "llmstages",
                 "--plot", "train/lm_loss", "--plot", "val_loss", "--plot-file", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0

    client = open_store(uri)
    runs = find_runs(client, stage="pretrain", experiments=["llmstages"])
    params, _ = differing_params(runs)
    fig = plot_metrics(client, runs, ["train/lm_loss"], [f"{r.info.run_name}, optim.lr={r.data.params['optim.lr']}"
                                                        for r in runs])
    (ax,) = fig.axes[:1]
    assert params == ["optim.lr"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("optimizer step", "train/lm_loss (nats/token)",
                                                                  "train/lm_loss")
    assert len(ax.lines) == 3 and fig.get_suptitle()
    assert list(ax.lines[2].get_xdata()) == [0, 10, 20, 30, 40]
    assert list(ax.lines[2].get_ydata()) == [4.0, 3.1, 2.9, 2.8, 2.75]
    assert "pretrain-a, optim.lr=0.001" in [t.get_text() for t in ax.get_legend().get_texts()]

    fig = plot_metrics(client, runs, ["train/lm_loss", "val_loss"], [r.info.run_name for r in runs])
    colours = [{line.get_label(): line.get_color() for line in ax.lines} for ax in fig.axes[:2]]
    assert colours[0] == {k: v for k, v in colours[1].items() if k in colours[0]}  # a run's colour in every panel

    png.unlink()
    with pytest.raises(SystemExit) as exc:  # a misspelt metric: an error naming what there is, and no PNG
        main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--plot", "nope", "--plot-file", str(png)])
    assert str(exc.value.code).startswith("llmstages compare: --plot nope: no run here logged it; these runs have the "
                                          "curves train/lm_loss")
    assert "final values (" in str(exc.value.code) and not png.exists()
    with pytest.raises(SystemExit) as exc:  # a near miss: the closest names first
        main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--plot", "train/lm_los"])
    assert "--plot train/lm_los: no run here logged it (did you mean train/lm_loss?)" in str(exc.value.code)


def test_errors(store, capsys, tmp_path):
    db = tmp_path / "missing.db"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--tracking-uri", f"sqlite:///{db}"])
    assert "no MLflow store at" in str(exc.value.code) and str(db) in str(exc.value.code)
    assert not db.exists()  # nothing created as a side effect

    from mlflow.tracking import MlflowClient

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(empty).search_experiments()  # creates the tables, no runs
    uri, _ = store
    for args, message in [(["--tracking-uri", empty], "no runs in"),
                          (["--tracking-uri", uri, "--stage", "reward"], "no runs match stage=reward"),
                          (["--tracking-uri", uri, "--experiment", "nope"], "no experiment named nope"),
                          (["--tracking-uri", uri, "--tag", "oops"], "--tag wants key=value"),
                          (["--tracking-uri", uri, "--last", "0"], "--last wants a positive number")]:
        with pytest.raises(SystemExit) as exc:
            main(["compare", *args])
        assert str(exc.value.code).startswith("llmstages compare: ") and message in str(exc.value.code)
        assert "\n" not in str(exc.value.code)


def test_bad_paths_and_foreign_databases_are_one_line_errors(store, capsys, tmp_path):
    import sqlite3

    uri, _ = store
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    before = other.read_bytes()
    for args, message in [(["--tracking-uri", f"sqlite:///{other}"], "is not an MLflow store"),
                          (["--tracking-uri", uri, "-o", str(tmp_path / "nodir" / "x.csv")], "--output"),
                          (["--tracking-uri", uri, "-o", str(tmp_path)], "--output"),
                          (["--tracking-uri", uri, "--plot", "train/lm_loss", "--plot-file",
                            str(tmp_path / "nodir" / "x.png")], "--plot-file")]:
        with pytest.raises(SystemExit) as exc:
            main(["compare", *args])
        assert str(exc.value.code).startswith("llmstages compare: ") and message in str(exc.value.code)
        assert "\n" not in str(exc.value.code)
    assert other.read_bytes() == before  # a foreign database is never migrated
    with pytest.raises(SystemExit) as exc:  # only unknown metrics: nothing to show
        main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--metric", "nosuch", "--format", "csv"])
    assert str(exc.value.code).startswith("llmstages compare: no listed run logged nosuch (known: ")
    capsys.readouterr()
    main(["compare", "--tracking-uri", uri, "--stage", "pretrain", "--metric", "nosuch", "--metric", "val_loss",
          "--format", "csv"])
    out = capsys.readouterr()
    assert "no listed run logged nosuch (known: " in out.err and out.out.splitlines()[0].endswith("nosuch,val_loss")
