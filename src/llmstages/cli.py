"""The ``llmstages`` command: run a stage (Hydra app), compose ``params.yaml``, or generate from a stage output.

Heavy imports (torch, Lightning, trackers) happen only once a command needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import STAGES

USAGE = """\
usage: llmstages <command> [options]

Train a chat language model through pretraining, SFT and RLHF, one Hydra-configured stage at a time.

stages (Hydra apps: key=value overrides, -m/--multirun sweeps, --cfg job to print the config, --help):
  data        corpus -> BPE tokenizer, token files, SFT / preference / RL-prompt sets
  pretrain    next-token prediction on the token files            e.g. llmstages pretrain model=tiny trainer.max_steps=50
  sft         supervised fine-tuning on chat-formatted pairs      e.g. llmstages sft -m optim.lr=1e-4,3e-4
  reward      Bradley-Terry reward model on preference pairs
  rlhf        PPO, DPO or GRPO from the SFT model                 e.g. llmstages rlhf algorithm=dpo

  Sweeps: -m optim.lr=1e-4,3e-4,1e-3 (basic), or hparams_search=pretrain_optuna|sft_optuna|reward_optuna (Optuna);
  each job in outputs/multirun/<stage>/<time>_<id>/<job>/, with summary.md/.csv of the objective (objective.metric).
  Keys may carry the stage's section as in params.yaml: `llmstages rlhf rlhf.algorithm=grpo` = `algorithm=grpo`.
  experiment=<name> runs the stage with its part of a pipeline preset: `llmstages sft experiment=tiny`.
  A stage given --params FILE (as dvc.yaml does) trains with FILE's section for that stage instead of
  composing conf/, and writes to outputs/<stage>/.

other commands:
  params      compose conf/config.yaml (+ overrides) into params.yaml, as DVC does
  generate    answer a prompt with one or more stage outputs      e.g. llmstages generate "What's 2 + 2?"
  chat        talk with a model in the terminal (multi-turn)      e.g. llmstages chat outputs/rlhf
  compare     tracked runs side by side: differing params, metrics e.g. llmstages compare --stage sft --plot val/lm_loss
  export      a stage output as a Hugging Face checkpoint           e.g. llmstages export outputs/rlhf exported/rlhf

Pipeline: dvc repro (all stages), dvc exp run -S 'sft.optim.lr=1e-4' (an experiment), dvc exp show,
  dvc exp run --queue -S 'pretrain.optim.lr=1e-3,3e-4' then dvc queue start (a grid), dvc plots show.
Config folder: ./conf, or $LLMSTAGES_CONF.  llmstages --version prints the version.
"""


def conf_dir() -> Path:
    """The Hydra config folder: ``$LLMSTAGES_CONF``, else ``./conf``, else the source checkout's ``conf/``.

    Raises:
        SystemExit: when none exists.
    """
    for cand in (os.environ.get("LLMSTAGES_CONF"), "conf", Path(__file__).resolve().parents[2] / "conf"):
        if cand and Path(cand, "config.yaml").is_file():
            return Path(cand).resolve()
    sys.exit("llmstages: no config folder found (./conf/config.yaml); run from the project root or set LLMSTAGES_CONF")


def run_stage(stage: str, cfg, out_dir: str | Path | None, source: str) -> dict:
    """Validate ``cfg`` for ``stage`` and run it; returns the stage metrics."""
    import importlib
    import warnings

    from .config import validate

    # Known-harmless noise: Lightning's pytree shim on newer torch, and the frozen reference/reward models
    # that the rlhf stage keeps in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's StatefulDataLoader on newer torch
    # Runs are bounded by max_steps, and the last step's metrics are always logged (is_log_step).
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # A resumed run's CSV logger: tracking.make_loggers keeps the file Lightning says it will delete.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    _start_mlflow_early(cfg)
    cfg = validate(stage, cfg, source, runs_here=True)
    out = Path(out_dir or cfg.out_dir or f"outputs/{stage}")
    _check_writable(stage, out)  # before training, not after it
    try:
        module = importlib.import_module(f"llmstages.stages.{stage}")
        _route_lightning_logs()
        metrics = module.run(cfg, out)
    except BaseException as err:
        from .stages.stage import fail_open_stages

        from .mlflow_process import MlflowProcessError

        fail_open_stages(interrupted=isinstance(err, (KeyboardInterrupt, SystemExit)))
        # Lightning turns Ctrl-C into sys.exit(1) (raised while handling the KeyboardInterrupt) and SIGTERM into
        # SystemExit(None), exit 0: both become a line and the shell's status for the signal, 130 and 143.
        if isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt):
            print(f"llmstages {stage}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        if type(err).__name__ == "SIGTERMException":
            print(f"llmstages {stage}: stopped by SIGTERM", file=sys.stderr)
            raise SystemExit(143) from None
        if not os.environ.get("LLMSTAGES_DEBUG"):  # LLMSTAGES_DEBUG=1 shows the traceback
            if isinstance(err, (FileNotFoundError, NotADirectoryError, ValueError)):
                # Bad input (a file, a value): the message names it; no traceback wall.
                sys.exit(f"llmstages {stage}: error: {err}")
            if isinstance(err, MlflowProcessError):  # the store (logger.mlflow_tracking_uri) refused
                sys.exit(f"llmstages {stage}: MLflow error (logger.mlflow_tracking_uri): {err}")
        raise
    from .runtime import is_rank_zero

    if not is_rank_zero():
        return metrics  # another DDP process: rank 0 reports
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{stage} metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console = Console(stderr=True)

    def on_broken_pipe() -> None:  # Rich's own exits with 1 (`llmstages sft 2>&1 | head`): the work is done
        from .runtime import discard_output

        console.quiet = True
        discard_output("stderr")

    console.on_broken_pipe = on_broken_pipe
    console.print(table)
    console.print(f"written to {out / 'metrics.json'}", soft_wrap=True, highlight=False)  # one line, any width
    return metrics


def _start_mlflow_early(cfg) -> None:
    """Start the MLflow process (:mod:`llmstages.mlflow_process`) now, when the config tracks to MLflow, so that
    it opens the store on another core while this process imports torch and Lightning. Not under DDP's other
    ranks (they track nothing); a config that cannot say is left to the validation that follows."""
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return
    try:
        lc = cfg.logger
        if "mlflow" not in list(lc.backends):
            return
        from .tracking import absolute_uri, project_path

        uri = absolute_uri(project_path(str(lc.mlflow_tracking_uri)))
    except Exception:  # noqa: BLE001  (validate() names what is wrong)
        return
    from . import mlflow_process

    mlflow_process.start(uri)


def _check_writable(stage: str, out: Path) -> None:
    """Exit with a one-line error if ``out`` cannot be made: its nearest existing ancestor is not a folder, or a
    file cannot be created in it (read-only, no permission)."""
    import tempfile

    base = out.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    why = "is not a folder" if not base.is_dir() else ""
    if not why:
        try:
            tempfile.TemporaryFile(dir=base).close()
        except OSError as err:
            why = f"is not writable ({err.strerror or err})"
    if why:
        what = "" if base == out.absolute() else f" cannot be made: {base}"
        sys.exit(f"llmstages {stage}: output folder {out}{what} {why}")


def _route_lightning_logs() -> None:
    """One line per Lightning message, without Lightning's ads, and log lines above the progress bar, not in it.

    ``import lightning`` gives the ``lightning`` logger a console handler of its own ("INFO: ...") that also
    passes each record on to the root logger. Under Hydra, whose job logging gives the root logger a console and
    a file handler, every Lightning line came out twice; there Lightning's own console handlers are dropped and
    its records go through Hydra's (so they reach the job's log file too). Lightning's "💡 Tip" lines about its
    cloud products are dropped everywhere. Console handlers write to ``sys.stdout``/``sys.stderr`` as they are at
    each write (:class:`_CurrentStream`), so in a terminal a line logged while the bar is drawn comes above it.
    """
    import logging

    for h in logging.getLogger().handlers + logging.getLogger("llmstages").handlers:
        if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr):
            h.setStream(_CurrentStream("stdout" if h.stream is sys.stdout else "stderr"))

    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                lg.removeHandler(h)
            lg.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # added once, however often called


class _CurrentStream:
    """``sys.<name>`` as it is at each write. While Rich draws a live progress bar it puts a proxy there that
    prints each line above the bar; a handler holding the real stream wrote into the bar's line instead."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        self._call("write", text)
        return len(text)

    def flush(self) -> None:
        self._call("flush")

    def _call(self, method: str, *args) -> None:
        try:
            getattr(getattr(sys, self.name), method)(*args)
        except BrokenPipeError:  # the reader has gone (`| head`): the stage goes on without printing
            from .runtime import discard_output

            discard_output(self.name)


def _no_tips(record) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def _params_mode(stage: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"llmstages {stage}")
    parser.add_argument("--params", required=True, help="composed params file (params.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/<stage>)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        from .config import stage_keys

        def fixed(override: str) -> str:  # a key that is not the stage's: the one it may mean (lr -> optim.lr)
            key, sep, value = override.removeprefix(f"{stage}.").partition("=")
            hint = stage_keys(key, [stage]) if sep else []
            return f"{hint[0].removeprefix(f'{stage}.') if hint else key}{sep}{value}"

        keys = [fixed(a) for a in extra]
        dvc_sets = " ".join(f"-S '{stage}.{k}'" for k in keys)
        parser.error(f"--params {args.params} takes no overrides, got: {' '.join(extra)}. Edit the '{stage}' "
                     f"section of {args.params}, or compose from conf/ with the overrides: llmstages {stage} "
                     f"{' '.join(keys)} (or, in a DVC project: dvc exp run {dvc_sets})")
    from omegaconf import OmegaConf

    from .config import ConfigError

    import logging

    # Hydra configures logging in the other mode; here the stage's own INFO lines (e.g. the rlhf time split)
    # need a handler of their own.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("llmstages")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    path = Path(args.params)
    if not path.is_file():
        sys.exit(f"llmstages {stage}: {path} not found (compose it with: llmstages params)")
    params = OmegaConf.load(path)
    if stage not in params:
        sys.exit(f"llmstages {stage}: {path} has no '{stage}' section (recompose it with: llmstages params)")
    try:
        run_stage(stage, params[stage], args.out or f"outputs/{stage}", source=str(path))
    except ConfigError as err:
        sys.exit(f"llmstages {stage}: {err}")
    return 0


def strip_stage_prefix(stage: str, arg: str) -> str:
    """``rlhf.algorithm=dpo`` -> ``algorithm=dpo`` for ``llmstages rlhf``: keys may be written as in params.yaml
    (with the stage's section) or as in the stage's own config (without); ``+``/``++``/``~`` prefixes are kept.

    The data stage has a section named ``data`` of its own, so there ``data.corpus=...`` is kept as written and
    only a prefix followed by a top-level key is dropped (``data.data.corpus``, ``data.vocab_size``)."""
    from dataclasses import fields

    from .config import SCHEMAS

    sign = arg[: len(arg) - len(arg.lstrip("+~"))]
    rest = arg[len(sign):]
    if not rest.startswith(f"{stage}."):
        return arg
    inner = rest[len(stage) + 1:]
    top = {f.name for f in fields(SCHEMAS[stage])} if stage in SCHEMAS else set()
    if stage in top and inner.split("=")[0].split(".")[0] not in top:
        return arg
    return sign + inner


def experiment_override(stage: str, arg: str) -> str:
    """``experiment=NAME`` (or ``+experiment=NAME``, as for the pipeline) -> ``experiment_stage/<stage>@_global_=NAME``
    for ``llmstages <stage>``: a single stage takes its own part of an experiment preset
    (``conf/experiment_stage/<stage>/NAME.yaml``; ``conf/experiment/NAME.yaml`` gathers the parts for the
    pipeline). Any other override is returned unchanged."""
    key, sep, value = arg.lstrip("+").partition("=")
    return f"experiment_stage/{stage}@_global_={value}" if sep and key == "experiment" else arg


def _hydra_mode(stage: str, argv: list[str]) -> int:
    """Run ``stage`` as a Hydra app composing ``conf/entry/<stage>.yaml``; the app returns the objective.

    The objective is ``metrics[objective.metric]`` as a float (what a sweeper such as Optuna optimises). In a multirun
    each job gets ``LLMSTAGES_SWEEP`` (the sweep folder) and ``LLMSTAGES_SWEEP_JOB`` (its number) in the environment,
    and a job that stops with a one-line error is recorded by Hydra as failed (:class:`~llmstages.sweep.JobFailed`);
    an ``objective.metric`` the stage does not report stops the whole sweep (every job would fail the same way);
    in a single run it is a warning (the run has trained and written its output).
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import ConfigError, unknown_override
    from .sweep import JobFailed, register_resolvers

    register_resolvers()  # ${llmstages.uid:} in hydra.run.dir / hydra.sweep.dir

    script = sys.argv[0]

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=f"entry/{stage}")
    def app(cfg):
        hc = HydraConfig.get()
        sweep = hc.mode == RunMode.MULTIRUN
        # What Lightning's DDP launcher reruns for each further process (adding hydra.run.dir and a job name):
        # this command with this job's overrides (sys.argv[0] is "llmstages <stage>" while Hydra parses).
        sys.argv = [script, stage, *hc.overrides.task]
        if sweep:
            os.environ["LLMSTAGES_SWEEP"] = str(hc.sweep.dir)  # as configured: outputs/multirun/<stage>/<time>_<id>
            os.environ["LLMSTAGES_SWEEP_JOB"] = str(hc.job.num)
        else:
            os.environ.pop("LLMSTAGES_SWEEP", None)
            os.environ.pop("LLMSTAGES_SWEEP_JOB", None)
        try:
            try:
                metrics = run_stage(stage, cfg, cfg.get("out_dir") or hc.runtime.output_dir,
                                    source="config (conf/ + command-line overrides)")
            except ConfigError as err:
                sys.exit(f"llmstages {stage}: {err}")
        except SystemExit as err:
            if isinstance(err.code, str):
                _to_run_log(err.code)
            if not (sweep and isinstance(err.code, str)):
                raise
            raise JobFailed(err.code) from None  # Hydra records this job as failed (the sweeper decides the rest)
        from .runtime import is_rank_zero

        if not is_rank_zero():
            return None  # another DDP process: rank 0 reports
        key = cfg.objective.metric
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            what = "is not a metric of" if key not in metrics else f"is {value!r}, not a number, in"
            msg = f"objective.metric={key!r} {what} this stage's metrics.json; expected one of: {', '.join(numeric)}"
            if sweep:
                sys.exit(f"llmstages {stage}: {msg}")
            # A single run has trained and written its output: only a sweep needs the objective.
            print(f"llmstages {stage}: warning: {msg} (a sweep with it would stop)", file=sys.stderr)
            return None
        return float(value)

    overrides = [experiment_override(stage, strip_stage_prefix(stage, a)) for a in argv]
    groups = _config_groups()  # model=tiny, trainer=gpu, ...: Hydra's to check
    for override in overrides:  # before Hydra, whose own message would suggest adding the misspelt key with +
        if msg := unknown_override(stage, override, groups):
            sys.exit(f"llmstages {stage}: command-line override {override!r}: {msg}")
    sys.argv = [f"llmstages {stage}", *overrides]
    app()
    return 0


def _config_groups() -> set[str]:
    """The config groups of ``conf/`` (its folders: model, trainer, logger, ...)."""
    return {p.name for p in conf_dir().iterdir() if p.is_dir()}


def _to_run_log(message: str) -> None:
    """Write ``message`` (why a run stopped) to the log files Hydra opened for it (``<run dir>/<stage>.log``), so
    that a refused run's folder says why; the console gets it from the exit itself."""
    import logging

    record = logging.LogRecord("llmstages", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def compose_params(overrides: list[str], output: str | Path = "params.yaml") -> Path:
    """Compose ``conf/config.yaml`` with ``overrides`` into ``output`` exactly as DVC's Hydra composition does.

    Raises:
        hydra.errors.HydraException: for an unknown key or group option in ``overrides``.
        llmstages.config.ConfigError: when a stage section fails validation (nothing is written then).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    from .config import validate

    for stage in STAGES:  # refuse to write a params file that a stage would reject
        validate(stage, cfg[stage], source="composed params")
    OmegaConf.resolve(cfg)
    Path(output).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    return Path(output)


def _params_cmd(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmstages params",
        description="Compose conf/config.yaml with the overrides into params.yaml, as DVC does for dvc repro and "
                    "dvc exp run -S. Keys start with a stage's section (data, pretrain, sft, reward, rlhf); config "
                    "groups are chosen as in conf/config.yaml (model@pretrain.model=tiny); experiment=NAME applies "
                    "a preset of conf/experiment/. Unknown keys and values a stage would refuse are errors, and "
                    "then nothing is written.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sft.optim.lr=1e-4 rlhf.algorithm=dpo")
    parser.add_argument("-o", "--output", default="params.yaml", help="file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    from .config import ConfigError, stage_keys, unknown_override

    # experiment=NAME as for a single stage; the pipeline config has no default experiment, so Hydra needs "+"
    overrides = [f"+{o}" if o.partition("=")[0] == "experiment" else o for o in args.overrides]
    groups = _config_groups()
    for o in overrides:  # a stage section's key: named with its suggestion, where Hydra would suggest "+key"
        section, _, rest = o.partition(".")
        if section in STAGES and (msg := unknown_override(section, rest, groups, prefix=f"{section}.")):
            sys.exit(f"llmstages params: override {o!r}: {msg}")
        key = o.partition("=")[0].lstrip("+~")  # `+`, `++`, `~` (add, force, delete): Hydra checks the rest
        if key.partition(".")[0].partition("@")[0] not in {*STAGES, *groups, "hydra"}:
            # `lr=1e-3` (Hydra: "use +lr=1e-3", which writes a key no stage reads): a stage's key, for each stage
            hints = stage_keys(key)
            sys.exit(f"llmstages params: override {o!r}: params.yaml's keys start with a stage's section ("
                     f"{', '.join(STAGES)}), and no stage reads '{key}'"
                     + (f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""))
    if not Path(args.output).resolve().parent.is_dir():
        sys.exit(f"llmstages params: -o {args.output}: the folder {Path(args.output).parent} does not exist")
    try:
        print(compose_params(overrides, args.output))
    except (HydraException, ConfigError) as err:
        sys.exit(f"llmstages params: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"llmstages {version('llmstages')}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in STAGES:
        if "--params" in rest or any(a.startswith("--params=") for a in rest):
            return _params_mode(cmd, rest)
        return _hydra_mode(cmd, rest)
    if cmd == "params":
        return _params_cmd(rest)
    if cmd in ("generate", "chat", "compare", "export"):
        from . import commands

        return {"generate": commands.generate_cmd, "chat": commands.chat_cmd, "compare": commands.compare_cmd,
                "export": commands.export_cmd}[cmd](rest)
    from .config import closest

    commands = [*STAGES, "params", "generate", "chat", "compare", "export"]
    hint = f"; did you mean {match!r}?" if (match := closest(cmd, commands)) else ""
    print(f"llmstages: unknown command {cmd!r}{hint}\n\n{USAGE}", file=sys.stderr)
    return 2


def exit_without_teardown(code: int) -> NoReturn:
    """End the process as the interpreter's own exit does, less the teardown: :func:`threading._shutdown` (the
    thread pools' exit hooks, then every non-daemon thread joined), the ``atexit`` callbacks (trackers finish
    their runs and flush, log handlers close, DataLoader workers stop), stdout and stderr flushed, then
    ``os._exit(code)``. Skipped: destroying every module and object and the C++ libraries' static destructors,
    which take 2.4 s after a stage on a 2-core CPU once torch, Lightning, MLflow and W&B are imported (0.1 s
    this way; ``benchmarks/overhead.py``'s "exit" column). A process that imported no torch exits normally."""
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first (CPython 3.x)
    if "torch" not in sys.modules or shutdown is None or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    import atexit

    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to write
            pass
    os._exit(code)


def entry() -> NoReturn:
    """The ``llmstages`` console script and ``python -m llmstages.cli``: :func:`main`, then
    :func:`exit_without_teardown` with its exit code. An error (``SystemExit`` with a message, an exception)
    leaves through the interpreter's normal exit; Ctrl-C (where Lightning does not catch it: during start-up)
    is one line and exit status 130, its traceback only with ``LLMSTAGES_DEBUG=1``."""
    try:
        code = main()
    except KeyboardInterrupt:
        if os.environ.get("LLMSTAGES_DEBUG"):
            raise
        print("llmstages: interrupted", file=sys.stderr)
        code = 130
    exit_without_teardown(code)


if __name__ == "__main__":
    entry()
