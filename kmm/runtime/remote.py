"""Actors whose code runs in a child process: the owner's side (docs/wire.md).

The process that owns the machine runs every kernel operation. A spawned actor keeps its
place in the scheduler as a *proxy* actor (same name, id and CPU as in-process); its code
(a daemon's policy loop, a program's CPU thread) runs in a child, and each operation it
performs is a ``Call`` frame. When the scheduler runs the proxy, the proxy waits for the
child's next frame (real I/O while every other actor stays parked, so no decision depends
on the wall clock) and executes the operation exactly as the in-process actor would, then
answers ``Reply`` or ``Fault``. The owner's trace is therefore byte-identical whichever
actors are spawned.

Supervision: a child that exits, crashes, sends a malformed frame or stays silent longer
than its timeout stops the run with ``ChildDied``, naming the actor, its pid, its last
operation and the locks it held, as an oops would; every child is killed and reaped on
every exit path (``Child.aclose``), and a child started by kmm also dies with its owner
(PR_SET_PDEATHSIG, kmm.runtime.child).

This module knows nothing of the machine: the objects whose methods a child may call are
passed in (``object_dispatch``), and their interface is read with ``inspect``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shlex
import signal
import subprocess
import sys
import types
import typing
from typing import Any, Awaitable, Callable

import trio

from kmm.runtime.msgs import WireError
from kmm.runtime.sched import SchedError
from kmm.runtime.wire import PROTOCOL, Bye, Call, Fault, FrameStream, Hello, Reply, plain

__all__ = ["ChildDied", "SpawnError", "Child", "SPAWNABLE", "parse_spawn", "spawned", "open_child",
           "serve", "object_dispatch", "interface", "plain", "daemon_runner",
           "ExecDaemon", "start_exec_daemon", "reap_all", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 60.0   # wall seconds a child may stay silent (kmm run --child-timeout)
# A child's start (an interpreter, its imports) is not a hang: on a loaded machine it
# takes seconds, so the wait for its Hello is never shorter than this.
STARTUP_TIMEOUT = 30.0
CLOSE_GRACE = 2.0        # wall seconds a child gets to exit after its pipe closes

# what `kmm run --spawn LIST` accepts besides a daemon's name
SPAWN_GROUPS = {"cpus": "every CPU actor of a program", "daemons": "every daemon"}
SPAWNABLE = ("khugepaged", "kswapd", "kcompactd")


class SpawnError(ValueError):
    """A spawn request that cannot be honoured: an unknown name in --spawn, an exec
    command that does not start, a daemon class a child cannot import."""


class ChildDied(SchedError):
    """A spawned actor's process failed; the run stops as on an oops.

    Carries the actor's ``name``, the child's ``pid``, its ``last_op`` (the last call it
    made and the last preemption point executed for it) and the locks it ``held``."""

    def __init__(self, actor: str, pid: int | None, reason: str, last_op: str = "",
                 held: tuple[str, ...] = ()) -> None:
        self.actor, self.pid, self.reason = actor, pid, reason
        self.last_op, self.held = last_op, tuple(held)
        super().__init__(
            f"actor {actor} (child pid {pid if pid is not None else '?'}) {reason}; "
            f"last operation: {last_op or 'none'}; "
            f"locks held: {', '.join(held) or 'none'}")


def parse_spawn(text: str, daemons: typing.Iterable[str] = ()) -> frozenset[str]:
    """``--spawn LIST``: comma-separated ``cpus``, ``daemons`` or daemon names (the
    built-ins and ``daemons``, e.g. plug-ins given with --daemon or installed). An
    unknown name is a ValueError listing the valid ones."""
    valid = sorted(set(SPAWN_GROUPS) | set(SPAWNABLE) | set(daemons))
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise SpawnError(f"--spawn: empty list (valid: {', '.join(valid)})")
    bad = [n for n in names if n not in valid]
    if bad:
        raise SpawnError(f"--spawn: unknown actor {bad[0]!r} (valid: {', '.join(valid)})")
    return frozenset(names)


def spawned(m, name: str, kind: str = "daemon") -> bool:
    """Does this run place the actor named ``name`` in a child process?"""
    spawn = getattr(m, "spawn", None) or ()
    if kind == "daemon":
        return name in spawn or "daemons" in spawn
    return "cpus" in spawn


# --- plain data -------------------------------------------------------------------------
def _shape(tp: Any) -> Any:
    """How a child rebuilds a return value of type ``tp`` from plain data: None (as is),
    "tuple", {"record": "module:qualname"} or ["list", shape]."""
    if dataclasses.is_dataclass(tp):
        return {"record": f"{tp.__module__}:{tp.__qualname__}"}
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _shape(args[0])
    if tp is tuple or origin is tuple:
        return "tuple"
    if origin is list and args:
        inner = _shape(args[0])
        return ["list", inner] if inner is not None else None
    return None


def interface(cls: type) -> dict[str, dict]:
    """The public calls of ``cls`` as a child sees them: for each name its ``kind``
    ("async", "sync", "property" or "setter", the last a property that may be written)
    and the ``shape`` of its value."""
    out: dict[str, dict] = {}
    for name, obj in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if isinstance(obj, property):
            kind, fn = ("setter" if obj.fset else "property"), obj.fget
        elif inspect.iscoroutinefunction(obj):
            kind, fn = "async", obj
        elif inspect.isfunction(obj):
            kind, fn = "sync", obj
        else:
            continue
        try:
            ret = typing.get_type_hints(fn).get("return")
        except Exception:  # an annotation the owner cannot resolve: sent as is
            ret = None
        out[name] = {"kind": kind, "shape": _shape(ret)}
    return out


Dispatch = Callable[[Call], Awaitable[Any]]


def object_dispatch(obj: Any) -> tuple[dict[str, dict], Dispatch]:
    """The interface of ``obj``'s class and a dispatcher running a Call on ``obj``: a
    property is read with no argument and written with one; a coroutine method is
    awaited, a plain one called."""
    iface = interface(type(obj))

    async def dispatch(call: Call) -> Any:
        entry = iface.get(call.method)
        if entry is None:
            raise AttributeError(f"no call named {call.method!r}")
        kind = entry["kind"]
        if kind in ("property", "setter"):
            if not call.args:
                return getattr(obj, call.method)
            if kind != "setter" or len(call.args) != 1 or call.kwargs:
                raise TypeError(f"{call.method}: a property is read with no argument"
                                " and written with one (if writable)")
            setattr(obj, call.method, call.args[0])
            return None
        value = getattr(obj, call.method)(*call.args, **call.kwargs)
        if kind == "async":
            value = await value
        return value

    return iface, dispatch


# --- one child process ------------------------------------------------------------------
class Child:
    """One child process and its frame stream; ``aclose`` kills and reaps it."""

    def __init__(self, proc: trio.Process, actor: str, timeout: float) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.actor = actor
        self.timeout = timeout
        self.stream = FrameStream(proc.stdin, proc.stdout, f"actor {actor}")
        self.last_call = ""
        self.hello: Hello | None = None
        _LIVE.add(self)

    async def receive(self, waiting_for: str = "its next frame",
                      timeout: float | None = None):
        """The child's next record; a silence longer than ``timeout`` wall seconds
        (default: the child's), a malformed frame or the end of the stream is
        ``ChildDied``."""
        timeout = timeout or self.timeout
        try:
            with trio.move_on_after(timeout):
                msg = await self.stream.receive()
                if msg is None:
                    raise ChildDied(self.actor, self.pid, await self._exit_reason())
                return msg
        except WireError as e:
            raise ChildDied(self.actor, self.pid,
                            f"sent a malformed frame ({e}){_text_hint(self.stream)}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChildDied(self.actor, self.pid, await self._exit_reason()) from None
        raise ChildDied(self.actor, self.pid,
                        f"hung: sent no frame for {timeout:g} s while the owner "
                        f"waited for {waiting_for}")

    async def send(self, msg) -> None:
        try:
            await self.stream.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChildDied(self.actor, self.pid, await self._exit_reason()) from None

    async def _exit_reason(self) -> str:
        with trio.move_on_after(CLOSE_GRACE):
            await self.proc.wait()
        rc = self.proc.returncode
        if rc is None:
            return "closed its pipe but did not exit"
        if rc < 0:
            return f"was killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Close the pipes (a child waiting for a reply sees the end and exits), give it
        ``grace`` seconds, then SIGKILL it; always reaped, even when cancelled."""
        with trio.CancelScope(shield=True):
            for s in (self.proc.stdin, self.proc.stdout):
                try:
                    await s.aclose()
                except Exception:
                    pass
            if self.proc.returncode is None and grace > 0:
                with trio.move_on_after(grace):
                    await self.proc.wait()
            if self.proc.returncode is None:
                _kill(self.proc)
                await self.proc.wait()
        _LIVE.discard(self)


def _text_hint(stream) -> str:
    """A frame header that reads as text: the child printed to its stdout, which is
    the protocol's pipe (docs/wire.md)."""
    head = bytes(getattr(stream, "_buf", b"")[:24])
    if len(head) >= 4 and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:4]):
        text = head.decode("ascii", "replace").split("\n")[0]
        return (f"; it begins {text!r}, text: does the actor print to stdout? stdout "
                "carries the protocol; print to stderr")
    return ""


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


_LIVE: set[Child] = set()


def reap_all() -> None:
    """Kill and reap every child still open (outside trio: the last exit path)."""
    for child in list(_LIVE):
        if child.proc.returncode is None:
            _kill(child.proc)
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
        _LIVE.discard(child)


async def open_child(argv: list[str], actor: str | None, *, timeout: float,
                     interface: dict | None = None, startup: float | None = None) -> Child:
    """Start ``argv`` with the protocol on its stdin/stdout, wait for its ``Hello``
    (which must name ``actor``, if given, and speak PROTOCOL), and answer with
    ``Reply(0, {"actor", "calls"})``: the calls it may make (``interface``).
    ``startup`` bounds the wait for the Hello (default: ``timeout``, at least
    STARTUP_TIMEOUT); a run's explicit --child-timeout is passed here."""
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    child = Child(proc, actor or argv[-1], timeout)
    try:
        hello = await child.receive("its Hello", startup or max(timeout, STARTUP_TIMEOUT))
        if isinstance(hello, Fault):
            raise ChildDied(child.actor, child.pid,
                            f"failed before its hello: {hello.error}: {hello.message}")
        if not isinstance(hello, Hello):
            raise ChildDied(child.actor, child.pid,
                            f"sent {hello.kind!r} before its hello")
        if hello.protocol != PROTOCOL:
            raise ChildDied(child.actor, child.pid,
                            f"speaks protocol {hello.protocol}, the owner {PROTOCOL}")
        if actor is not None and hello.actor != actor:
            raise ChildDied(child.actor, child.pid,
                            f"introduced itself as {hello.actor!r}")
        if not hello.actor or not isinstance(hello.actor, str):
            raise ChildDied(child.actor, child.pid, "sent a hello without an actor name")
        child.actor, child.hello = hello.actor, hello
        await child.send(Reply(0, {"actor": hello.actor, "calls": interface or {}}))
    except BaseException:
        await child.aclose(grace=0)
        raise
    return child


CALL_ERRORS: tuple[type[Exception], ...] = (AttributeError, TypeError, ValueError,
                                          LookupError)
"""What a bad call raises (no such call, wrong arguments, an unknown knob): sent to the
child as a ``Fault``, raised there in the actor's code. Anything else an operation
raises (a kernel BUG, a lockdep splat, a deadlock) stops the run in the owner, as it
would in-process where no policy code catches an oops."""


async def serve(child: Child, dispatch: Dispatch, actor=None) -> Any:
    """Execute the child's Calls through ``dispatch`` until it says Bye; return the
    value it sent. ``actor`` (the proxy's scheduler Actor) feeds the death report."""
    while True:
        msg = await child.receive()
        if isinstance(msg, Call):
            child.last_call = msg.method
            try:
                value = plain(await dispatch(msg), f"{msg.method}'s value")
            except CALL_ERRORS as e:  # a bad call: the child's code sees it
                await child.send(Fault(msg.id, type(e).__name__, str(e)))
                continue
            await child.send(Reply(msg.id, value))
        elif isinstance(msg, Bye):
            return msg.value
        elif isinstance(msg, Fault):
            raise _died(child, actor, f"failed: {msg.error}: {msg.message}")
        else:
            raise _died(child, actor, f"sent an unexpected {msg.kind!r} record")


def _died(child: Child, actor, reason: str) -> ChildDied:
    point = getattr(actor, "last_op", "") if actor is not None else ""
    last = child.last_call or ""
    if point:
        last = f"{last} (last preemption point: {point})" if last else point
    held = tuple(h.lock.name for h in getattr(actor, "held", ()) or ())
    return ChildDied(child.actor, child.pid, reason, last, held)


async def supervise(child: Child, dispatch: Dispatch, actor=None) -> Any:
    """``serve`` until Bye, with the death report filled in and the child reaped on
    every exit path (cancellation at the end of the run included)."""
    try:
        return await serve(child, dispatch, actor)
    except ChildDied as e:
        if e.last_op or e.held or actor is None:
            raise
        raise _died(child, actor, e.reason) from None
    finally:
        await child.aclose()


# --- daemons ----------------------------------------------------------------------------
def _daemon_spec(cls: type) -> str:
    """How a child finds ``cls``: ``module:Qualname`` if the module is importable by
    name, else ``/path/file.py:Qualname``."""
    import importlib.util
    mod = cls.__module__
    try:
        found = mod != "__main__" and importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        path = getattr(sys.modules.get(mod), "__file__", None)
        if path is None:
            raise SpawnError(f"daemon {cls.__qualname__}: its module {mod!r} cannot be "
                             "imported by a child process")
        mod = os.path.abspath(path)
    return f"{mod}:{cls.__qualname__}"


def daemon_runner(m, daemon) -> Callable[[Any], Awaitable[Any]] | None:
    """The proxy's body for a daemon this run spawns (``None`` if it runs in-process):
    on its first turn it starts ``python -m kmm.runtime.child daemon SPEC``, then
    serves its calls on the daemon's context."""
    if isinstance(daemon, ExecDaemon) or not spawned(m, daemon.name):
        return None
    spec = _daemon_spec(type(daemon))
    timeout = getattr(m, "child_timeout", None) or DEFAULT_TIMEOUT

    async def run(ctx) -> Any:
        iface, dispatch = object_dispatch(ctx)
        argv = [sys.executable, "-m", "kmm.runtime.child", "daemon", spec]
        child = await open_child(argv, daemon.name, timeout=timeout, interface=iface,
                                 startup=getattr(m, "child_startup", None))
        return await supervise(child, dispatch, m.sched.current)

    return run


class ExecDaemon:
    """A daemon written without kmm (``kmm run --daemon exec:COMMAND``): an already
    started child speaking docs/wire.md on its stdin/stdout; named by its Hello."""

    def __init__(self, m, child: Child) -> None:
        self._m = m
        self.child = child
        self.name = child.actor

    async def run(self, ctx) -> Any:
        _, dispatch = object_dispatch(ctx)
        return await supervise(self.child, dispatch, self._m.sched.current)


async def start_exec_daemon(m, command: str, context_cls: type, *,
                            timeout: float | None = None) -> ExecDaemon:
    """Start ``COMMAND`` (shell words, no shell) and shake hands; the daemon is named by
    its Hello. ``context_cls`` is the context class whose calls it may make."""
    argv = shlex.split(command)
    if not argv:
        raise SpawnError("--daemon exec: needs a command")
    if argv[0] in ("python", "python3"):  # this interpreter, not whatever PATH finds first
        argv[0] = sys.executable
    timeout = timeout or getattr(m, "child_timeout", None) or DEFAULT_TIMEOUT
    try:
        child = await open_child(argv, None, timeout=timeout,
                                 interface=interface(context_cls),
                                 startup=getattr(m, "child_startup", None))
    except OSError as e:
        raise SpawnError(f"--daemon exec:{command}: cannot start: {e}") from None
    return ExecDaemon(m, child)
