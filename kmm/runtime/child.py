"""A spawned actor's process: ``python -m kmm.runtime.child ROLE ARGS...``.

The owner (kmm.runtime.remote) starts it with the protocol on stdin/stdout. The child
moves those fds out of the way first (stdout then goes to stderr, stdin to /dev/null), so
a print() in user code cannot corrupt a frame; asks to be killed if the owner dies
(PR_SET_PDEATHSIG); says ``Hello``; and drives its actor's coroutine synchronously: the
proxy's async methods do a blocking round trip and return without suspending, so no event
loop is needed (``drive``). At the end it sends ``Bye`` with the actor's return value, or
``Fault`` if the actor's code raised, and exits. The end of the owner's stream (the run is
over) ends the child quietly.

Roles: ``daemon SPEC`` (SPEC is ``module:Class`` or ``/path/file.py:Class``, a daemon
class whose ``run(ctx)`` gets a ``RemoteContext``); further roles register in ``ROLES``
(``kmm.runtime.child_program`` adds the program roles, if present).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable

from kmm.runtime.msgs import WireError
from kmm.runtime.wire import PROTOCOL, Bye, Call, Fault, Hello, Reply, SyncFrames, plain


class OwnerGone(Exception):
    """The owner closed the stream: the run is over (or the owner died)."""


class RemoteError(Exception):
    """An operation the owner refused with an error that is not a Python builtin."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error


class Connection:
    """The child's end: Calls out, Replies in, one at a time."""

    def __init__(self, frames: SyncFrames, actor: str) -> None:
        self.frames = frames
        self.actor = actor
        self.next_id = 1
        self.calls: dict[str, dict] = {}

    def hello(self) -> dict:
        """Send Hello; the owner's Reply 0 lists the calls this actor may make."""
        self.frames.send(Hello(self.actor, os.getpid(), PROTOCOL))
        msg = self.frames.receive()
        if msg is None:
            raise OwnerGone()
        if not isinstance(msg, Reply) or msg.id != 0 or not isinstance(msg.value, dict):
            raise WireError(f"owner answered the hello with a {msg.kind!r} record")
        self.calls = msg.value.get("calls") or {}
        return msg.value

    def call(self, method: str, args=(), kwargs=None) -> Any:
        """One blocking round trip: the owner runs ``method`` at this actor's turn."""
        cid = self.next_id
        self.next_id += 1
        self.frames.send(Call(cid, self.actor, method, plain(list(args), method),
                              plain(dict(kwargs or {}), method)))
        msg = self.frames.receive()
        if msg is None:
            raise OwnerGone()
        if isinstance(msg, Reply) and msg.id == cid:
            return msg.value
        if isinstance(msg, Fault) and msg.id == cid:
            cls = getattr(builtins, msg.error, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(msg.message)
            raise RemoteError(msg.error, msg.message)
        raise WireError(f"owner answered call {cid} with a {msg.kind!r} record")


def revive(value: Any, shape: Any) -> Any:
    """Rebuild a value from plain data by the shape the owner sent (remote._shape)."""
    if value is None or shape is None:
        return value
    if shape == "tuple":
        return tuple(value)
    if isinstance(shape, list) and shape[0] == "list":
        return [revive(v, shape[1]) for v in value]
    if isinstance(shape, dict) and "record" in shape:
        return load_object(shape["record"])(**value)
    return value


class RemoteContext:
    """The daemon's ``ctx`` in a child: every public call of the owner's context, each
    a round trip (coroutine calls awaitable, plain calls returning, properties read and
    written), with the same values (records rebuilt from plain data)."""

    def __init__(self, conn: Connection) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "name", conn.actor)

    def __getattr__(self, attr: str):
        conn = object.__getattribute__(self, "_conn")
        entry = conn.calls.get(attr)
        if entry is None:
            raise AttributeError(f"DaemonContext has no call {attr!r}")
        kind, shape = entry.get("kind"), entry.get("shape")
        if kind in ("property", "setter"):
            return revive(conn.call(attr), shape)
        if kind == "async":
            async def method(*args, **kwargs):
                return revive(conn.call(attr, args, kwargs), shape)
        else:
            def method(*args, **kwargs):
                return revive(conn.call(attr, args, kwargs), shape)
        method.__name__ = attr
        return method

    def __setattr__(self, attr: str, value: Any) -> None:
        conn = object.__getattribute__(self, "_conn")
        if (conn.calls.get(attr) or {}).get("kind") != "setter":
            raise AttributeError(f"DaemonContext.{attr} cannot be written")
        conn.call(attr, [value])


def drive(coro) -> Any:
    """Run a coroutine whose awaits all complete at once (the proxies' round trips)."""
    try:
        while True:
            coro.send(None)
            coro.close()
            raise RuntimeError("the actor's code awaited something other than a kmm "
                               "operation (an event loop's primitive): not possible in a "
                               "spawned actor")
    except StopIteration as stop:
        return stop.value


def load_object(spec: str) -> Any:
    """``module:Qual.name`` or ``/path/file.py:Qual.name``."""
    module, _, qual = spec.rpartition(":")
    if not module or not qual:
        raise ValueError(f"{spec!r}: expected module:Class")
    if module.endswith(".py"):
        name = f"kmm_child_{os.path.basename(module)[:-3]}"
        mspec = importlib.util.spec_from_file_location(name, module)
        if mspec is None or mspec.loader is None:
            raise ValueError(f"{spec!r}: cannot load {module}")
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        mspec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    obj = mod
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def daemon_role(frames: SyncFrames, argv: list[str]) -> Any:
    """``daemon SPEC``: run the daemon class's ``run(ctx)`` against the owner."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m kmm.runtime.child daemon module:Class")
    cls = load_object(argv[0])
    conn = Connection(frames, cls.name)
    conn.hello()
    return conn, (lambda: drive(cls().run(RemoteContext(conn))))


ROLES: dict[str, Callable] = {"daemon": daemon_role}


def _private_fds() -> SyncFrames:
    """The protocol on fds of our own; fd 1 becomes stderr and fd 0 /dev/null."""
    rfd, wfd = os.dup(0), os.dup(1)   # dup'd fds are not inherited by grandchildren
    sys.stdout.flush()
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return SyncFrames(rfd, wfd, "owner")


def _die_with_owner() -> None:
    """No child outlives its owner: a watchdog thread exits when we are reparented.

    Not PR_SET_PDEATHSIG: that fires when the *thread* that forked us exits, and trio
    starts children from a worker thread that exits after 10 s idle, which killed every
    child living longer than that."""
    import threading
    import time
    owner = os.getppid()
    if owner == 1:  # the owner died already
        os._exit(1)

    def watch() -> None:
        while os.getppid() == owner:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    frames = _private_fds()
    _die_with_owner()
    if not argv:
        print("usage: python -m kmm.runtime.child ROLE ARGS...", file=sys.stderr)
        return 2
    role = ROLES.get(argv[0])
    if role is None:
        try:
            role = importlib.import_module("kmm.runtime.child_program").ROLES[argv[0]]
        except (ImportError, AttributeError, KeyError):
            print(f"kmm.runtime.child: unknown role {argv[0]!r}", file=sys.stderr)
            return 2
    conn = None
    try:
        conn, body = role(frames, argv[1:])
        value = body()
        frames.send(Bye(conn.actor, plain(value, "the actor's return value")))
        return 0
    except (OwnerGone, BrokenPipeError):
        return 0
    except KeyboardInterrupt:
        return 130
    except WireError as e:  # the owner's end is not speaking the protocol: one line
        print(f"kmm.runtime.child: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # the actor's code failed: report it, then exit
        if isinstance(e, SystemExit):
            raise
        traceback.print_exc()
        try:
            frames.send(Fault(conn.next_id - 1 if conn else 0, type(e).__name__, str(e)))
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    # run as the importable module, not as __main__: the roles (child_program) import
    # kmm.runtime.child, and its OwnerGone must be the one main() catches
    from kmm.runtime.child import main as _main
    sys.exit(_main())
