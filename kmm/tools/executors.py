"""Where independent runs go: this process, a local process pool, or a Ray cluster.

``kmm sweep`` (one run per grid point and seed) and ``kmm explore`` (ranges of
schedules) hand their work to an executor and read the results back; the result of a
piece of work depends only on its arguments, so the same work gives the same table on
every executor, and the caller (not the executor) decides the order of the results.

- ``InlineExecutor``: one job, in this process (nothing to start).
- ``LocalExecutor``: a pool of forked worker processes (``--jobs N``), no server; the
  workers ignore Ctrl-C, die with the command and are killed and reaped when it is
  interrupted (kmm.tools.interrupt.WorkerPool).
- ``RayExecutor``: Ray tasks (``ray.remote`` functions, never actors) on the cluster at
  ``--ray ADDRESS``, or ``--ray auto``: the Ray already running in this process, the
  cluster RAY_ADDRESS names or ``ray start`` made on this machine, else a fresh local Ray
  with this machine's CPUs. An address that does not answer within
  ``CONNECT_TIMEOUT`` seconds is bad input (``ExecutorError``, one line). Ray is an
  optional extra: ``pip install 'kmm[ray]'``. On an interruption the pending tasks are
  cancelled, and a Ray this command started is shut down.

All three share one small interface: ``submit(fn, *args)`` gives a handle, ``wait(handles)``
blocks until at least one is done and returns the done ones, ``result(handle)`` gives
its value (or raises its exception), ``workers`` is how many run at once. ``fn`` must be
a module-level function (pickled by reference), its arguments plain data.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

CONNECT_TIMEOUT = 3.0  # seconds to wait for a Ray address to answer


class ExecutorError(Exception):
    """An executor that cannot start (Ray missing, an address that does not answer):
    one line for the user, exit 2."""


class InlineExecutor:
    """One job at a time in this process: ``wait`` runs the oldest pending piece."""

    workers = 1

    def __init__(self) -> None:
        self._done: dict[int, tuple[bool, Any]] = {}
        self._work: dict[int, tuple[Callable, tuple]] = {}
        self._next = 0

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._work.clear()

    def submit(self, fn: Callable, *args) -> int:
        self._next += 1
        self._work[self._next] = (fn, args)
        return self._next

    def wait(self, handles) -> list[int]:
        done = [h for h in handles if h in self._done]
        if done:
            return done
        h = min(handles)
        fn, args = self._work.pop(h)
        try:
            self._done[h] = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - handed back by result(), as a pool does
            self._done[h] = (False, e)
        return [h]

    def result(self, handle: int) -> Any:
        ok, value = self._done.pop(handle)
        if not ok:
            raise value
        return value


class LocalExecutor:
    """``jobs`` forked worker processes (kmm.tools.interrupt.WorkerPool)."""

    def __init__(self, jobs: int) -> None:
        self.workers = jobs
        self._ctx = None
        self._pool = None

    def __enter__(self) -> "LocalExecutor":
        import multiprocessing as mp
        from kmm.tools import interrupt
        self._ctx = interrupt.WorkerPool(self.workers, mp.get_context("fork"))
        self._pool = self._ctx.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._ctx.__exit__(kind, exc, tb)

    def submit(self, fn: Callable, *args):
        return self._pool.submit(fn, *args)

    def wait(self, handles) -> list:
        import concurrent.futures as cf
        done, _ = cf.wait(list(handles), return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> Any:
        return handle.result()


def _ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--ray needs Ray, an optional extra: pip install 'kmm[ray]'") \
            from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A Ray address (HOST:PORT, ray://HOST:PORT) whose port does not accept a TCP
    connection within ``timeout`` is bad input, said in one line (ray.init itself
    would wait a minute or more)."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ExecutorError(f"--ray {address}: not a Ray address (HOST:PORT, "
                            "ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = (f"no answer within {timeout:g}s" if isinstance(e, TimeoutError)
               else (e.strerror or str(e)))
        raise ExecutorError(f"--ray {address}: cannot reach a Ray cluster there ({why})") \
            from None


def ray_connect(address: str) -> bool:
    """Connect this process to Ray (module docstring); True when this call started a
    Ray of its own (to be shut down after the work)."""
    import logging
    ray = _ray()
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env not in ("auto", "local"):
            check_address(env)  # the cluster RAY_ADDRESS names must answer too
        try:
            ray.init(address="auto", **quiet)
            return True
        except ConnectionError:  # no cluster around: a local one for this command
            ray.init(**quiet)
            return True
    check_address(address)
    try:
        ray.init(address=address, **quiet)
    except Exception as e:  # noqa: BLE001 - whatever Ray says, in one line
        msg = " ".join(str(e).split())[:200]
        raise ExecutorError(f"--ray {address}: cannot connect ({msg})") from None
    return True


class RayExecutor:
    """Ray tasks on a cluster (module docstring); one task per piece of work."""

    def __init__(self, address: str = "auto") -> None:
        self.address = address
        self.workers = 1
        self._started = False
        self._remote: dict[Callable, Any] = {}
        self._pending: set = set()

    def __enter__(self) -> "RayExecutor":
        ray = _ray()
        was_running = ray.is_initialized()
        try:
            self._started = ray_connect(self.address)
            self.workers = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        except BaseException:  # Ctrl-C while Ray starts: no half-started Ray stays
            if not was_running:
                try:
                    ray.shutdown()
                except Exception:  # noqa: BLE001 - nothing was started
                    pass
            raise
        return self

    def __exit__(self, kind, exc, tb) -> None:
        ray = _ray()
        if kind is not None:  # interrupted or failed: nothing goes on running for us
            for ref in self._pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
        self._pending.clear()
        if self._started:
            ray.shutdown()

    def submit(self, fn: Callable, *args):
        ray = _ray()
        task = self._remote.get(fn)
        if task is None:
            # a failed run is a result, never retried; a lost worker is
            task = self._remote[fn] = ray.remote(num_cpus=1, max_retries=3,
                                                 retry_exceptions=False)(fn)
        ref = task.remote(*args)
        self._pending.add(ref)
        return ref

    def wait(self, handles) -> list:
        ray = _ray()
        refs = list(handles)
        ready, rest = ray.wait(refs, num_returns=1)
        if rest:  # whatever else is ready too, without waiting
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, handle) -> Any:
        ray = _ray()
        self._pending.discard(handle)
        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as e:  # the task's own exception
            cause = e.as_instanceof_cause()
            raise (getattr(cause, "cause", None) or cause) from None


def make(jobs: int = 1, ray: str | None = None):
    """The executor of ``--jobs N`` / ``--ray auto|ADDRESS``."""
    if ray is not None:
        _ray()  # a missing extra is said before anything starts
        return RayExecutor(ray)
    if jobs <= 1:
        return InlineExecutor()
    return LocalExecutor(jobs)
