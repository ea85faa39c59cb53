"""MLflow's client in a process of its own, so that opening it overlaps a stage's start-up.

Importing MLflow and opening its SQL store cost about 2 s of one CPU core (on a 2-core AMD EPYC: ``import
mlflow`` 1.0 s, the SQLAlchemy store with its ORM and Alembic 0.9-1.1 s), all of it Python holding the GIL, so
a thread cannot hide it. A stage starts this process first (:func:`start`, before it imports torch and
Lightning); it opens the store on another core meanwhile, and the stage's own process never imports MLflow.

The stage talks to it through a pair of pipes: :func:`call` runs ``fn(client, *args, **kwargs)`` there, ``fn``
a module-level function (pickled by name, so its module must be importable without torch or Lightning:
:mod:`llmstages.tracking`), ``client`` the :class:`mlflow.tracking.MlflowClient` of a tracking URI, and
returns its result, which must be plain Python (no MLflow objects: unpickling one would import MLflow here).
Each call runs in the caller's working directory and environment. Calls are synchronous and one at a time, so
when :func:`call` returns, what it logged is in the store.

The process ignores Ctrl-C (the stage marks its runs failed through it) and ends when the stage's process
ends (end of file on its pipe), however that ends.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # pid of the process that started it -> proc, send, recv, env


class MlflowProcessError(RuntimeError):
    """An error raised by MLflow in the MLflow process (its type and message, and the traceback there)."""


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
            if _STATE["proc"].poll() is None:
                return
            _STATE["send"].close()  # one that ended: a new one takes its place
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
                      recv=Connection(from_child, writable=False), env=None)
        if not _STATE.get("atexit"):
            atexit.register(stop)
            _STATE["atexit"] = True


def call(tracking_uri: str, fn: Callable, *args, **kwargs) -> Any:
    """``fn(client, *args, **kwargs)`` in the MLflow process, ``client`` the MlflowClient of ``tracking_uri``
    (an absolute location: the process may have another working directory between calls); starts the process
    if needed.

    Raises:
        MlflowProcessError: what MLflow (or ``fn``) raised there, other than a built-in exception, which is
            raised as it is (a ``ValueError`` stays one).
        RuntimeError: when the MLflow process has ended.
    """
    start()
    env = dict(os.environ)
    with _LOCK:
        proc, send, recv = _STATE["proc"], _STATE["send"], _STATE["recv"]
        changed = env if env != _STATE["env"] else None
        try:
            send.send((os.getcwd(), changed, tracking_uri, fn, args, kwargs))
            ok, value = recv.recv()
        except (EOFError, OSError) as err:
            code = proc.poll()
            raise RuntimeError(f"the MLflow process ended (exit code {code}); its error, if any, is above") \
                from err
        _STATE["env"] = env
    if ok:
        return value
    raise value


def stop() -> None:
    """End this process's MLflow process (it has nothing pending: every call waited for its result)."""
    with _LOCK:
        if _STATE.get("pid") != os.getpid():
            return
        proc = _STATE.pop("proc")
        for key in ("send", "recv"):
            _STATE.pop(key).close()
        _STATE.pop("pid")
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _serve(from_parent: int, to_parent: int, warm_uri: str) -> None:
    """The MLflow process: import what ``warm_uri``'s store needs (if given), then answer calls until the
    stage's process ends."""
    import pickle
    import signal
    import traceback
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
            cwd, env, uri, fn, args, kwargs = recv.recv()
        except (EOFError, OSError):
            break
        try:
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd != os.getcwd():
                os.chdir(cwd)
            reply = (True, fn(client(uri), *args, **kwargs))
        except BaseException as err:  # noqa: BLE001  (sent back to the stage, which raises it)
            if type(err).__module__ == "builtins":
                try:
                    pickle.dumps(err)
                    reply = (False, err)
                except Exception:  # noqa: BLE001
                    reply = (False, MlflowProcessError(f"{type(err).__name__}: {err}"))
            else:
                reply = (False, MlflowProcessError(f"{type(err).__name__}: {err}\n(in the MLflow process)\n"
                                                   + "".join(traceback.format_exception(err))))
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
