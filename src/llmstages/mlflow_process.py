"""MLflow's client in a process of its own, so that opening it overlaps a stage's start-up.

Importing MLflow and opening its SQL store cost about 2 s of one CPU core (on a 2-core AMD EPYC: ``import
mlflow`` 1.0 s, the SQLAlchemy store with its ORM and Alembic 0.9-1.1 s), all of it Python holding the GIL, so
a thread cannot hide it. A stage starts this process first (:func:`start`, before it imports torch and
Lightning); it imports MLflow on another core meanwhile, and the stage's own process never imports MLflow.

The stage talks to it through a pair of pipes: :func:`call` runs ``fn(client, *args, **kwargs)`` there, ``fn``
a module-level function (pickled by name, so its module must be importable without torch or Lightning:
:mod:`llmstages.tracking`), ``client`` the :class:`mlflow.tracking.MlflowClient` of a tracking URI, and
returns its result, which must be plain Python (no MLflow objects: unpickling one would import MLflow here).
Each call runs in the caller's working directory and environment, one at a time, in the order sent. :func:`call`
waits for the result, so when it returns, what it and everything sent before logged is in the store;
:func:`post` (the metrics of each logged training step, the parameters) does not wait, and a failure of a posted
call is a warning line on stderr, not the end of the training (a locked store must not cost the model).

The process ignores Ctrl-C (the stage marks its runs failed through it; a call interrupted in the stage leaves
no answer behind for the next one) and ends when the stage's process ends (end of file on its pipe), however
that ends.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("llmstages")
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # pid (of the process that started it), proc, send, recv, env (last sent), seq


class MlflowProcessError(RuntimeError):
    """An error raised by MLflow in the MLflow process: ``str()`` is one line, ``<type>: <message>`` with the
    tracking URI; ``details`` holds the traceback there."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def start(tracking_uri: str | None = None) -> None:
    """Start the MLflow process unless this process has one; with ``tracking_uri``, it imports at once what
    that store and a stage's first calls need (nothing is written until the first call: a config refused
    meanwhile leaves no store behind).

    Raises:
        OSError: when the process cannot be started.
    """
    from multiprocessing.connection import Connection

    with _LOCK:
        if _STATE.get("pid") == os.getpid():
            code = _STATE["proc"].poll()
            if code is None:
                return
            log.warning("the MLflow process ended (exit code %s); starting another: runs go on, MLflow's "
                        "system-metrics sampler does not", code)
            _STATE["send"].close()
            _STATE["recv"].close()
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        env = dict(os.environ)
        src = Path(__file__).resolve().parents[1]
        if src.name not in ("site-packages", "dist-packages"):  # a source tree: llmstages importable from it
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(src), os.environ.get("PYTHONPATH"))))
        argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "llmstages"
        proc = subprocess.Popen([sys.executable, "-m", "llmstages.mlflow_process", str(from_parent), str(to_parent),
                                 argv0, tracking_uri or ""], pass_fds=(from_parent, to_parent), env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(from_parent)
        os.close(to_parent)
        _STATE.update(pid=os.getpid(), proc=proc, send=Connection(to_child, readable=False),
                      recv=Connection(from_child, writable=False), env=None, seq=itertools.count())
        if not _STATE.get("atexit"):
            atexit.register(stop)
            _STATE["atexit"] = True


def call(tracking_uri: str, fn: Callable, *args, **kwargs) -> Any:
    """``fn(client, *args, **kwargs)`` in the MLflow process, ``client`` the MlflowClient of ``tracking_uri``
    (an absolute location: the process may have another working directory between calls); starts the process
    if needed. Waits for the result, so everything sent before (:func:`post`) is done too.

    Raises:
        MlflowProcessError: what MLflow (or ``fn``) raised there, other than a built-in exception, which is
            raised as it is (a ``ValueError`` stays one).
        RuntimeError: when the MLflow process has ended.
    """
    return _send(True, tracking_uri, fn, args, kwargs)


def post(tracking_uri: str, fn: Callable, *args, **kwargs) -> None:
    """:func:`call` without waiting: ``fn`` runs in the MLflow process while this one goes on (a training step
    does not wait for the store's write). If it fails, the MLflow process writes one warning line to stderr.

    Raises:
        RuntimeError: when the MLflow process has ended.
    """
    _send(False, tracking_uri, fn, args, kwargs)


def _send(wait: bool, tracking_uri: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    start()
    env = dict(os.environ)
    with _LOCK:
        proc, send, recv = _STATE["proc"], _STATE["send"], _STATE["recv"]
        seq = next(_STATE["seq"]) if wait else None
        try:
            with _signals_deferred():  # a message is sent whole, never cut by Ctrl-C
                send.send((seq, os.getcwd(), env if env != _STATE["env"] else None, tracking_uri, fn, args, kwargs))
                _STATE["env"] = env
            while wait:  # answers to calls interrupted before they came (Ctrl-C) are skipped: each has its number
                while not recv.poll(0.5):  # Ctrl-C while waiting: nothing read, the answer stays for the skip
                    if proc.poll() is not None:
                        raise EOFError
                with _signals_deferred():  # an answer is there: read all of it
                    got, ok, value = recv.recv()
                if got == seq:
                    break
        except (EOFError, OSError) as err:
            code = proc.poll()
            raise RuntimeError(f"the MLflow process ended (exit code {code}); its error, if any, is above") \
                from err
    if not wait:
        return None
    if ok:
        return value
    raise value


@contextlib.contextmanager
def _signals_deferred():
    """Hold back SIGINT and SIGTERM (Ctrl-C's KeyboardInterrupt, Lightning's handler) while a message is sent or
    read, so none is cut in two; each one that came meanwhile is raised again after. Only in the main thread
    (the only one where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import signal

    came: list[int] = []
    old = {sig: signal.signal(sig, lambda num, frame: came.append(num)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in came:
            signal.raise_signal(sig)


def stop() -> None:
    """End this process's MLflow process, once it has run what was posted to it (end of file on its pipe comes
    after them)."""
    with _LOCK:
        if _STATE.get("pid") != os.getpid():
            return
        proc = _STATE.pop("proc")
        for key in ("send", "recv"):
            _STATE.pop(key).close()
        _STATE.pop("pid")
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _error(err: BaseException, uri: str) -> BaseException:
    """``err`` as it can go back to the stage: a built-in exception as it is, others as MlflowProcessError."""
    import pickle
    import traceback

    if type(err).__module__ == "builtins":
        try:
            pickle.dumps(err)
            return err
        except Exception:  # noqa: BLE001
            pass
    message = " ".join(str(err).split(" [SQL:")[0].split()) or type(err).__name__  # not SQLAlchemy's statement
    message = message if len(message) <= 300 else message[:300] + "..."
    return MlflowProcessError(f"{type(err).__name__}: {message} (tracking URI {uri})",
                              "".join(traceback.format_exception(err)))


def _serve(from_parent: int, to_parent: int, warm_uri: str) -> None:
    """The MLflow process: import what ``warm_uri``'s store needs (if given), then answer calls until the
    stage's process ends."""
    import signal
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its SQL and traceback per error: the
    # caller gets the error (one line; MlflowProcessError.details has the traceback)
    recv, send = Connection(from_parent, writable=False), Connection(to_parent, readable=False)
    from mlflow.tracking import MlflowClient

    clients: dict[str, MlflowClient] = {}

    def client(uri: str) -> MlflowClient:
        if uri not in clients:
            clients[uri] = MlflowClient(uri)
        return clients[uri]

    if warm_uri:  # import what the stage's first calls need; opening the store itself then takes ~0.05 s
        import mlflow.data.dataset_source_registry  # noqa: F401
        import mlflow.data.meta_dataset  # noqa: F401
        import mlflow.tracking.context.registry  # noqa: F401

        if warm_uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    while True:
        try:
            seq, cwd, env, uri, fn, args, kwargs = recv.recv()
        except (EOFError, OSError):
            break
        try:
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd != os.getcwd():
                os.chdir(cwd)
            reply = (seq, True, fn(client(uri), *args, **kwargs))
        except BaseException as err:  # noqa: BLE001  (sent back to the stage, which raises it)
            reply = (seq, False, _error(err, uri))
        if seq is None:  # posted: nobody waits for it
            if not reply[1]:
                sys.stderr.write(f"llmstages: warning: MLflow failed in {fn.__name__.strip('_')} (the stage goes "
                                 f"on without what it logged): {reply[2]}\n")
                sys.stderr.flush()
            continue
        try:
            send.send(reply)
        except (EOFError, OSError):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: the stage's process may be waiting for this one's end


if __name__ == "__main__":
    _from_parent, _to_parent, _argv0, _uri = sys.argv[1:5]
    sys.argv = [_argv0]  # MLflow's run context (source name, git) reads the stage's command, as in-process
    from llmstages.mlflow_process import _serve as serve  # its errors pickled under the importable module's name

    serve(int(_from_parent), int(_to_parent), _uri)
