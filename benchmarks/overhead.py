"""Benchmark: the fixed costs around the training: ``llmstages --help``, composing the config, a no-op ``dvc repro``,
and each training stage's start-up and shut-down.

1. ``llmstages --help`` as a subprocess (the venv's console script): best and median wall time of ``--runs`` runs
   after one untimed run, and, in a separate interpreter, which heavy packages importing ``llmstages.cli`` and
   printing the help loads (none of torch, lightning, mlflow, wandb, hydra should be). PASS/FAIL: median < 1 s and
   no heavy import.
2. Composing ``conf/config.yaml`` with every stage section, as ``llmstages params`` does
   (``llmstages.cli.compose_params``: Hydra compose, resolve, validate the five sections, write the YAML): in a
   fresh interpreter (the imports, the first compose with the heavy packages it imports, then best/median of the
   next calls, all in-process), and ``llmstages params -o <temp file>`` as a subprocess (never the repo's own
   params.yaml).
3. A no-op ``dvc repro``: a project copy built as the fixture of tests/test_pipeline_dvc.py does (conf, src,
   dvc.yaml, .gitignore; ``git init``; ``dvc init``; ``dvc config hydra.enabled True``;
   ``llmstages params +experiment=tiny``; commit), reproduced once (all five stages on the tiny preset: a minute
   or two), then ``dvc repro`` again ``--dvc-runs`` times (3), each of which must run no stage. PASS/FAIL: median < 5 s.
   The stages run the copy's own ``src`` (``PYTHONPATH``), so edits to the checkout while it runs do not leak in.
   ``--dir DIR`` keeps the project in DIR, and a later run with the same DIR reuses it and skips the first repro.
4. In that project, each training stage once more as ``dvc repro`` runs it (``llmstages <stage> --params
   params.yaml``, into ``outputs/overhead-<stage>``, logger as configured): the stage's own log line splits its
   process's time into start-up (process start to the first training step: imports, config, data, models, the
   evaluation before training), training, and after training (evaluation, saving, tracking); the wall time of
   the subprocess less that gives the exit (threads joined, trackers' exit hooks; the interpreter's teardown is
   skipped, see ``llmstages.cli.exit_without_teardown``). PASS/FAIL per stage: start-up at most 5 s, and after
   training + exit at most 5 s. It says whether ``transformers`` (the ``hf`` extra) is installed: torchmetrics,
   which Lightning imports, then imports it in every stage, about 0.9 s of start-up on a 2-core CPU.
5. Loading a model's weights at GPT-2-small shapes (12 layers, d 768, vocabulary 4,096: 88 M parameters), in
   this process, ``--runs`` rounds interleaved: :meth:`llmstages.model.GPT.from_weights` (what
   ``load_output`` and the Hugging Face import do: modules on the meta device, tensors assigned) against building
   the model with its random initialisation and copying the weights in (what they did before). INFO, no check.
6. Logging one training step's metrics (10 values) to MLflow through the MLflow process
   (:mod:`llmstages.mlflow_process`), a temporary SQLite store, ``--log-points`` points each way, interleaved: the
   time the stage waits per point when it waits for the store's write (``call``, how every point was logged
   before) against posting it (``post``, how :class:`MLflowRun` logs now), and the time for the posted points
   to be in the store. INFO, no check.

Subprocesses get the venv's ``bin`` first on ``PATH`` (``llmstages``, ``dvc``), as the tests' ``sh`` helper does.

Example::

    python benchmarks/overhead.py --skip-dvc               # --help and compose only (seconds)
    python benchmarks/overhead.py --dir /tmp/llmstages-noop # all three; reuse /tmp/llmstages-noop next time
    python benchmarks/overhead.py --runs 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAVY = ("torch", "lightning", "mlflow", "wandb", "hydra", "omegaconf", "dvc", "tokenizers", "numpy")
MUST_NOT = ("torch", "lightning", "mlflow", "wandb", "hydra")  # the brief's list: what --help must not import
HELP_LIMIT_S, NOOP_LIMIT_S, STAGE_LIMIT_S = 1.0, 5.0, 5.0
TRAINING_STAGES = ("pretrain", "sft", "reward", "rlhf")
SPLIT = re.compile(r"(\w+): ([\d.]+) s since the process started: start-up ([\d.]+) s, training ([\d.]+) s, "
                   r"after training ([\d.]+) s")
PROJECT_FILES = ("conf", "src", "dvc.yaml", ".gitignore")


def env(extra: dict | None = None) -> dict:
    """The environment of every subprocess: the venv's bin first on PATH, a git identity."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@example.com", **(extra or {})}


def run(args: list[str], cwd: Path, extra_env: dict | None = None, check: bool = True) -> tuple[float, str, int]:
    """Run ``args``; returns (wall seconds, stdout + stderr, exit code). Exits with the output's tail on failure
    when ``check``."""
    t0 = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, env=env(extra_env), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if check and p.returncode:
        sys.exit(f"{' '.join(args)} failed ({p.returncode}) in {cwd}:\n{out[-3000:]}")
    return dt, out, p.returncode


def repeat(args: list[str], cwd: Path, n: int, extra_env: dict | None = None) -> list[float]:
    run(args, cwd, extra_env)  # untimed: file cache, .pyc files
    return [run(args, cwd, extra_env)[0] for _ in range(n)]


def fmt(times: list[float]) -> str:
    return f"best {min(times):.3f} s, median {statistics.median(times):.3f} s ({len(times)} runs)"


def row(name: str, value: str) -> None:
    print(f"  {name:<44} {value}")


# --------------------------------------------------------------------------- 1. --help
def bench_help(n: int) -> bool:
    print("llmstages --help")
    times = repeat([str(BIN / "llmstages"), "--help"], ROOT, n)
    row("wall time (subprocess)", fmt(times))
    probe = ("import io, json, sys, contextlib\n"
             "import llmstages.cli as c\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "    c.main(['--help'])\n"
             f"print(json.dumps({{'usage': out.getvalue().startswith('usage: llmstages'), "
             f"'loaded': [m for m in {HEAVY!r} if m in sys.modules], 'n': len(sys.modules)}}))\n")
    _, out, _ = run([sys.executable, "-c", probe], ROOT)
    info = json.loads(out.strip().splitlines()[-1])
    bad = [m for m in info["loaded"] if m in MUST_NOT]
    row("heavy modules imported by --help", ", ".join(info["loaded"]) or f"none ({info['n']} modules in all)")
    _, imp, _ = run([sys.executable, "-X", "importtime", "-c", "import llmstages.cli"], ROOT)
    timings = re.finditer(r"import time:\s+(\d+) \|\s+(\d+) \|(.*)", imp)
    top = sorted(((int(m.group(2)), m.group(3).strip()) for m in timings), reverse=True)[:3]
    row("largest imports of llmstages.cli (cumulative)", ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in top))
    ok = statistics.median(times) < HELP_LIMIT_S and not bad and info["usage"]
    why = f"median {statistics.median(times):.3f} s" + (f", imports {', '.join(bad)}" if bad else "") + \
        ("" if info["usage"] else ", no usage text")
    print(f"{'PASS' if ok else 'FAIL'}: llmstages --help < {HELP_LIMIT_S:g} s without importing "
          f"{'/'.join(MUST_NOT)} ({why})")
    return ok


# --------------------------------------------------------------------------- 2. compose
def compose_worker(n: int) -> None:
    """In a fresh interpreter (nothing imported yet): the compose timings as one JSON line on stdout."""
    os.environ["LLMSTAGES_CONF"] = str(ROOT / "conf")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        t0 = time.perf_counter()
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401

        from llmstages.cli import compose_params
        res["import"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compose_params([], out)
        res["first"] = time.perf_counter() - t0
        res["heavy"] = [m for m in HEAVY if m in sys.modules]
        res["again"] = []
        for _ in range(n):
            t0 = time.perf_counter()
            compose_params([], out)
            res["again"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compose_params(["+experiment=tiny"], out)
        res["tiny"] = time.perf_counter() - t0
        res["size"], res["lines"] = out.stat().st_size, len(out.read_text().splitlines())
    print(json.dumps(res))


def bench_compose(n: int) -> None:
    print("compose conf/config.yaml (all stages), as `llmstages params`")
    _, out, _ = run([sys.executable, __file__, "--compose-worker", str(n)], ROOT)
    res = json.loads(out.strip().splitlines()[-1])
    row("import hydra + omegaconf + llmstages.cli", f"{res['import']:.3f} s (a fresh interpreter)")
    row("first compose_params() (incl. lazy imports)", f"{res['first']:.3f} s; it imported "
        + (", ".join(res["heavy"]) or "nothing heavy"))
    row("compose_params() again, in-process", fmt(res["again"]))
    row("compose_params(['+experiment=tiny'])", f"{res['tiny']:.3f} s")
    row("params.yaml written", f"{res['size']:,} bytes, {res['lines']} lines")
    with tempfile.TemporaryDirectory() as tmp:
        times = repeat([str(BIN / "llmstages"), "params", "-o", str(Path(tmp) / "params.yaml")], ROOT, n)
    row("llmstages params -o <temp> (subprocess)", fmt(times))


# --------------------------------------------------------------------------- 3. dvc repro
def make_project(repo: Path, overrides: list[str]) -> None:
    """The project copy of tests/test_pipeline_dvc.py's ``repo`` fixture, with the tiny preset in params.yaml."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name,
                                                           **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                              if src.is_dir() else {}))
    (repo / "outputs").mkdir()
    (repo / "outputs/.gitkeep").touch()
    pp = {"PYTHONPATH": str(repo / "src")}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "bench"],
                ["git", "config", "user.email", "bench@example.com"], ["dvc", "init", "-q"],
                ["dvc", "config", "hydra.enabled", "True"], ["llmstages", "params", "+experiment=tiny", *overrides],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny pipeline"]):
        run(cmd, repo, pp)


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def bench_dvc(n: int, folder: Path | None, keep: bool, overrides: list[str]) -> bool:
    print("no-op dvc repro (tiny preset)")
    repo = folder or Path(tempfile.mkdtemp(prefix="llmstages-bench-dvc-"))
    pp = {"PYTHONPATH": str(repo / "src")}
    reproduced = (repo / "dvc.lock").is_file() and (repo / "outputs/rlhf/metrics.json").is_file()
    try:
        if reproduced:
            row("project", f"{repo} (reused: already reproduced)")
        else:
            if repo.exists() and any(repo.iterdir()) and not (repo / "dvc.yaml").is_file():
                sys.exit(f"--dir {repo}: not empty and not a project made by this benchmark")
            if not (repo / "dvc.yaml").is_file():
                t0 = time.perf_counter()
                make_project(repo, overrides)
                row("project", f"{repo} (made in {time.perf_counter() - t0:.1f} s)")
            print("  first dvc repro (all five stages) ...", flush=True)
            dt, log, rc = run(["dvc", "repro"], repo, pp, check=False)
            if rc:
                print(f"FAIL: the first dvc repro failed ({rc}) after {dt:.0f} s:\n{log[-3000:]}")
                return False
            row("first dvc repro", f"{dt:.1f} s, stages run: {', '.join(ran_stages(log))}")
        times, logs = [], []
        for _ in range(n):
            dt, log, _ = run(["dvc", "repro"], repo, pp)
            times.append(dt)
            logs.append(log)
        reran = sorted({s for log in logs for s in ran_stages(log)})
        last = [x.strip() for x in logs[-1].splitlines() if x.strip()][-1:] or [""]
        row("no-op dvc repro", fmt(times) + f"; said: {last[0]!r}")
        dt, _, _ = run(["dvc", "status"], repo, pp)
        row("dvc status", f"{dt:.3f} s")
        ok = statistics.median(times) < NOOP_LIMIT_S and not reran
        why = f"median {statistics.median(times):.3f} s" + (f", but it ran {', '.join(reran)}" if reran else "")
        print(f"{'PASS' if ok else 'FAIL'}: no-op dvc repro < {NOOP_LIMIT_S:g} s and runs no stage ({why})")
        print()
        stages_ok = bench_stages(repo, pp)
        return ok and stages_ok
    finally:
        if folder is None and not keep:
            shutil.rmtree(repo, ignore_errors=True)
        else:
            row("kept", f"{repo} (pass --dir {repo} to reuse it)")


def bench_stages(repo: Path, extra_env: dict) -> bool:
    """Section 4 of the module docstring, in the reproduced project ``repo``."""
    import importlib.util

    print("training stages' start-up and shut-down (tiny preset, one run each)")
    hf = importlib.util.find_spec("transformers") is not None
    row("transformers (the hf extra)", "installed: torchmetrics, which Lightning imports, imports it in every "
        "stage (about 0.9 s of start-up)" if hf else "not installed (as `pip install -e .` leaves it)")
    print(f"  {'stage':<9} {'wall':>7} {'start-up':>9} {'training':>9} {'after':>7} {'exit':>6}")
    ok = True
    for stage in TRAINING_STAGES:
        dt, log, _ = run(["llmstages", stage, "--params", "params.yaml", "--out", f"outputs/overhead-{stage}"],
                         repo, extra_env)
        m = SPLIT.search(log)
        if not m:
            print(f"FAIL: {stage}: no start-up/training line in its log:\n{log[-2000:]}")
            return False
        since, startup, training, after = map(float, m.groups()[1:])
        exit_s = max(0.0, dt - since)
        print(f"  {stage:<9} {dt:6.1f}s {startup:8.1f}s {training:8.1f}s {after:6.1f}s {exit_s:5.1f}s")
        ok &= startup <= STAGE_LIMIT_S and after + exit_s <= STAGE_LIMIT_S
    print(f"{'PASS' if ok else 'FAIL'}: each stage's start-up <= {STAGE_LIMIT_S:g} s and its after-training + exit "
          f"<= {STAGE_LIMIT_S:g} s")
    return ok


# --------------------------------------------------------------------------- 5. model loading
def bench_load(rounds: int) -> None:
    """Section 5 of the module docstring: loading weights into a model at GPT-2-small shapes, both ways."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmstages.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
    print(f"loading a model's weights (GPT-2-small shapes: 12 layers, d 768, vocabulary 4,096; "
          f"{GPT(cfg).num_params(non_embedding=False) / 1e6:.0f} M parameters, float32)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in GPT(cfg).state_dict().items() if k != "lm_head.weight"}, str(path))

        def read() -> dict:
            sd = load_file(str(path))
            sd["lm_head.weight"] = sd["embed.weight"]  # tied, as load_output fills it
            return sd

        def init_then_copy() -> GPT:
            model = GPT(cfg)
            model.load_state_dict(read())
            return model

        ways = {"random init, then copy (before)": init_then_copy,
                "GPT.from_weights (load_output)": lambda: GPT.from_weights(cfg, read())}
        tokens = torch.randint(0, cfg.vocab_size, (1, 16))
        same = torch.equal(*(fn().eval()(tokens) for fn in ways.values()))  # untimed: also warms the file cache
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):  # interleaved: both see the same machine from one round to the next
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        row(name, fmt(ts))
    before, after = (statistics.median(ts) for ts in times.values())
    row("saved per load", f"{before - after:.2f} s ({before / after:.0f}x); same logits: {same}")


# --------------------------------------------------------------------------- 6. logging a step's metrics
def bench_logging(points: int) -> None:
    """Section 6 of the module docstring: one step's metrics to MLflow, waiting for the write or posting it."""
    from llmstages import mlflow_process
    from llmstages.tracking import _log_batch, _open_run

    print(f"logging a training step's metrics to MLflow (10 values, {points} points each way, interleaved)")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        run_id, _ = mlflow_process.call(uri, _open_run, "bench", f"{tmp}/artifacts", "bench", {}, {}, None, None)
        row("MLflow process ready, store made, run opened", f"{time.perf_counter() - t0:.2f} s")
        waits: dict[str, list[float]] = {"call: wait for the write (before)": [], "post (now)": []}
        for step in range(points):
            metrics = {f"train/m{i}": float(step + i) for i in range(10)}
            for name, send in zip(waits, (mlflow_process.call, mlflow_process.post)):
                t0 = time.perf_counter()
                send(uri, _log_batch, run_id, metrics=metrics, step=step, timestamp_ms=int(time.time() * 1000))
                waits[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mlflow_process.call(uri, _log_batch, run_id)  # waits for every posted point
        drained = time.perf_counter() - t0
        mlflow_process.stop()
    for name, ts in waits.items():
        row(f"{name}, per point", f"median {statistics.median(ts) * 1e3:.2f} ms, best {min(ts) * 1e3:.2f} ms")
    row("posted points left to write after the last", f"{drained * 1e3:.0f} ms (then all in the store)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of --help, compose and params (default 5)")
    ap.add_argument("--dvc-runs", type=int, default=3, help="timed no-op dvc repro runs (default 3)")
    ap.add_argument("--skip-dvc", action="store_true", help="skip the dvc repro part (the slow one)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="project folder for the dvc part: made and kept there, or reused if already reproduced")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (without --dir)")
    ap.add_argument("--params-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for `llmstages params +experiment=tiny` when making the project "
                         "(repeatable), e.g. pretrain.trainer.precision=32-true")
    ap.add_argument("--log-points", type=int, default=50, help="MLflow points logged each way (default 50)")
    ap.add_argument("--compose-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runs < 1 or args.dvc_runs < 1:
        ap.error("--runs and --dvc-runs must be >= 1")
    if args.compose_worker:
        compose_worker(args.compose_worker)
        return 0

    print(f"machine: {machine()}")
    print(f"python:  {sys.executable} (Python {platform.python_version()})")
    print()
    results = [("llmstages --help < 1 s", bench_help(args.runs))]
    print()
    bench_compose(args.runs)
    print()
    bench_load(args.runs)
    print()
    bench_logging(args.log_points)
    if not args.skip_dvc:
        print()
        folder = args.dir.resolve() if args.dir else None
        results.append(("no-op dvc repro < 5 s and stage start-up/shut-down <= 5 s",
                        bench_dvc(args.dvc_runs, folder, args.keep, args.params_override)))
    print()
    print("summary: " + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in results)
          + ("" if not args.skip_dvc else "; no-op dvc repro: skipped"))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
