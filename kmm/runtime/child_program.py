"""A program's CPU actors in child processes: the child's side (``kmm run --spawn cpus``).

``python -m kmm.runtime.child program PATH`` loads the program file and runs its
``main(k)`` against ``KernelProxy``: the same calls as kmm.workload's Kernel and Proc
(read from the interface the owner sends after the Hello, so a method added there works
here unchanged), each a blocking round trip to the owner, which performs it at the
actor's turn (kmm.runtime.remote_cpu). Coroutine methods are awaitable, plain ones
return, so the program's coroutine is driven synchronously, with no event loop.

``k.parallel(fn0, fn1, ...)`` forks one process per branch (``os.fork``: the closures
come along intact) and each runs ``fn_i(cpu)`` as its own actor, named and placed on a
CPU exactly as in-process. A branch talks to the owner through its parent, which relays
frames while it waits for the parallel call's reply: every frame carries its actor's
key (``main``, ``main/0``, ``main/0/1`` for nested parallels), so one pipe pair to the
owner serves the whole tree and no file (no named socket) is ever created.

Like fork(), the branches share nothing: a branch that mutates a Python object of the
program sees its own copy; only return values travel back, as plain data.

Values travel as msgpack with a few extension types (``encode``/``decode``), so a
program gets back what it would in-process: tuples stay tuples, dicts keep int keys, a
Proc is a handle the owner maps to its task, a Segv returned by a branch is a Segv.
"""

from __future__ import annotations

import builtins
import os
import select
import signal
import sys
import traceback
from typing import Any

import msgpack

from kmm.runtime.child import drive  # the same driver as a spawned daemon's
from kmm.runtime.wire import PROTOCOL, Bye, Call, Fault, Hello, Reply, SyncFrames

# extension type codes of the values in Call args, Reply values and Bye values
TUPLE, MAP, ERROR, PROC, OBJECT, FAILED = 1, 2, 3, 4, 5, 6

_UNPACK = dict(raw=False, strict_map_key=False)


def encode(v: Any, handle=None) -> Any:
    """``v`` as msgpack data; ``handle(obj)`` gives the Proc handle of an object that
    is one (else None)."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, msgpack.ExtType):
        return v  # already encoded (a branch's value relayed as is)
    if isinstance(v, list):
        return [encode(x, handle) for x in v]
    if isinstance(v, tuple):
        return _ext(TUPLE, [encode(x, handle) for x in v])
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {k: encode(x, handle) for k, x in v.items()}
        return _ext(MAP, [[encode(k, handle), encode(x, handle)] for k, x in v.items()])
    if isinstance(v, Exception):
        attrs = {k: x for k, x in vars(v).items() if _scalar(x)}
        return _ext(ERROR, [type(v).__name__, str(v), attrs])
    h = handle(v) if handle is not None else None
    if h is not None:
        return _ext(PROC, h)
    raise TypeError(f"a {type(v).__name__} cannot travel between processes "
                    "(plain data, tuples, Procs and exceptions can)")


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str, bytes))


def _ext(code: int, value: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def decode(v: Any, proc=None) -> Any:
    """The inverse of ``encode``; ``proc(handle)`` rebuilds a Proc, and an OBJECT or
    FAILED marker is returned as ``(code, data)`` for the caller to interpret."""
    if isinstance(v, list):
        return [decode(x, proc) for x in v]
    if isinstance(v, dict):
        return {k: decode(x, proc) for k, x in v.items()}
    if not isinstance(v, msgpack.ExtType):
        return v
    data = msgpack.unpackb(v.data, **_UNPACK)
    if v.code == TUPLE:
        return tuple(decode(x, proc) for x in data)
    if v.code == MAP:
        return {decode(k, proc): decode(x, proc) for k, x in data}
    if v.code == ERROR:
        return revive_error(*data)
    if v.code == PROC:
        return proc(data) if proc is not None else data
    return (v.code, data)


class RemoteError(Exception):
    """An error raised in the owner whose type this process does not know."""


_ERRORS: dict[str, type] = {}  # the owner's errors a program may catch, by name


def revive_error(error: str, message: str, attrs: dict | None = None) -> Exception:
    """The exception ``error`` (one the owner named, or a builtin) with its message."""
    cls = _ERRORS.get(error) or getattr(builtins, error, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return RemoteError(f"{error}: {message}")
    revive = getattr(cls, "_revive", None)  # an error that rebuilds itself from its text
    if revive is not None:
        try:
            return revive(message)
        except Exception:
            pass
    e = cls.__new__(cls)
    e.args = (message,)
    for k, x in (attrs or {}).items():
        try:
            setattr(e, k, x)
        except AttributeError:
            pass
    return e


# --- the process tree: one link per process, relaying its branches ----------------------
_LINK: list[Link] = []  # this process's link to the owner (one per process)
_CHILDREN: list[int] = []  # live branch pids of this process (the SIGTERM cascade)


def _on_term(signum, frame) -> None:
    """SIGTERM (the owner stops the run, or our parent died)."""
    _end(128 + signal.SIGTERM)


def _end(status: int) -> None:
    """Pass SIGTERM on to our branches, reap them, exit: no process of the tree is left
    behind, nor a zombie (PID 1 need not reap orphans)."""
    for pid in _CHILDREN:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in _CHILDREN:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    _exit(status)


class Link:
    """This process's end: Calls out, Replies in, one at a time."""

    def __init__(self, frames: SyncFrames, key: str, calls: dict) -> None:
        self.frames = frames
        self.key = key
        self.calls = calls  # {"k": interface(Kernel), "p": interface(Proc)}
        self.next_id = 1

    def _id(self) -> int:
        cid = self.next_id
        self.next_id += 1
        return cid

    def call(self, method: str, args=(), kwargs=None) -> Any:
        cid = self._id()
        self.frames.send(Call(cid, self.key, method, encode(list(args), _handle),
                              encode(dict(kwargs or {}), _handle)))
        return self._answer(cid, self._receive())

    def _receive(self):
        msg = self.frames.receive()
        if msg is None:  # the owner ended the run (or died): stop our branches too
            _end(0)
        return msg

    def _answer(self, cid: int, msg) -> Any:
        if isinstance(msg, Reply) and msg.id == cid:
            return decode(msg.value, self._proc)
        if isinstance(msg, Fault) and msg.id == cid:
            raise revive_error(msg.error, msg.message)
        raise RuntimeError(f"{self.key}: the owner answered call {cid} with {msg!r}")

    def _proc(self, h) -> "ProcProxy":
        tid, cpu, name = h
        return ProcProxy(KernelProxy(), tid, cpu, name)

    # ---------------------------------------------------------------- k.parallel
    def parallel(self, fns) -> list:
        """Fork one branch per function, ask the owner to run them as actors, relay
        their frames until the owner's reply (their results)."""
        cpus = self.call("k.cpus")
        cid = self._id()
        self.frames.send(Call(cid, self.key, "parallel", [len(fns)], {}))
        branches = []
        try:
            for i, fn in enumerate(fns):
                branches.append(self._fork(f"{self.key}/{i}", fn, i % cpus, branches))
            return self._answer(cid, self._relay(cid, branches))
        finally:
            for b in branches:
                b.close()
                if not b.done:
                    try:
                        os.kill(b.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                b.reap()

    def _fork(self, key: str, fn, cpu: int, siblings: list) -> "_Branch":
        down_r, down_w = os.pipe()  # parent -> branch
        up_r, up_w = os.pipe()      # branch -> parent
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the branch: never returns into the parent's stack
            status = 1
            try:
                os.close(down_w)
                os.close(up_r)
                for fd in (self.frames.rfd, self.frames.wfd):
                    os.close(fd)
                for b in siblings:
                    b.close()
                _CHILDREN.clear()
                _die_with_parent()
                status = _run_branch(Link(SyncFrames(down_r, up_w, "parent"), key,
                                          self.calls), fn, cpu)
            finally:
                _exit(status)
        os.close(down_r)
        os.close(up_w)
        _CHILDREN.append(pid)
        return _Branch(key, pid, SyncFrames(up_r, down_w, key))

    def _relay(self, cid: int, branches: list["_Branch"]):
        """Forward the branches' frames up and the owner's answers down (ids rewritten,
        as two branches may use the same) until the owner answers call ``cid``."""
        routes: dict[int, tuple[_Branch, int]] = {}
        live = {b.frames.rfd: b for b in branches}
        up = self.frames.rfd
        while True:
            ready, _, _ = select.select([up, *live], [], [])
            for fd in ready:
                if fd == up:
                    msg = self._receive()
                    if msg.id == cid:
                        return msg
                    b, orig = routes.pop(msg.id)
                    b.frames.send(type(msg)(orig, *_rest(msg)))
                    continue
                b = live[fd]
                msg = b.frames.receive()
                if msg is None:  # the branch is gone: without Bye, it died
                    del live[fd]
                    if not b.done:
                        self.frames.send(Bye(b.key, _ext(FAILED, ["died", b.reap()])))
                elif isinstance(msg, Call):
                    fid = self._id()
                    routes[fid] = (b, msg.id)
                    self.frames.send(Call(fid, msg.actor, msg.method, msg.args, msg.kwargs))
                else:  # Hello, Bye: tagged with their actor already
                    if isinstance(msg, Bye) and msg.actor == b.key:
                        b.done = True
                    self.frames.send(msg)


def _rest(msg) -> tuple:
    return (msg.value,) if isinstance(msg, Reply) else (msg.error, msg.message)


class _Branch:
    def __init__(self, key: str, pid: int, frames: SyncFrames) -> None:
        self.key, self.pid, self.frames = key, pid, frames
        self.done = False
        self.status: str | None = None

    def close(self) -> None:
        for fd in (self.frames.rfd, self.frames.wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def reap(self) -> str:
        if self.status is None:
            try:
                _, st = os.waitpid(self.pid, 0)
                self.status = (f"was killed by {signal.Signals(os.WTERMSIG(st)).name}"
                               if os.WIFSIGNALED(st) else
                               f"exited with status {os.WEXITSTATUS(st)}")
            except ChildProcessError:
                self.status = "exited"
            if self.pid in _CHILDREN:
                _CHILDREN.remove(self.pid)
        return self.status


def _run_branch(link: Link, fn, cpu: int) -> int:
    """A branch's body: Hello, ``fn(cpu)`` as the in-process thread runs it (a SIGSEGV
    or OOM is its result, not an error), Bye with the value. Its exit status."""
    _LINK[0] = link
    link.frames.send(Hello(link.key, os.getpid(), PROTOCOL))
    try:
        try:
            value = drive(fn(cpu))
        except tuple(_ERRORS.values()) as e:
            value = e
        link.frames.send(Bye(link.key, encode(value, _handle)))
        return 0
    except BrokenPipeError:
        return 0
    except BaseException as e:
        traceback.print_exc()
        try:
            link.frames.send(Bye(link.key, _ext(FAILED, [
                "failed", f"{type(e).__name__}: {e}"])))
        except OSError:
            pass
        return 1


def _exit(status: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): a branch whose parent dies stops too."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# --- the proxies --------------------------------------------------------------------------
def _handle(obj) -> list | None:
    if isinstance(obj, ProcProxy):
        return [obj._tid, obj.cpu, obj.name]
    return None


class KernelProxy:
    """``k`` in a spawned program: kmm.workload.Kernel's calls, each run by the owner."""

    def __init__(self) -> None:
        self.machine = MachineView(())

    @property
    def _link(self) -> Link:
        return _LINK[0]  # after a fork, the branch's own link: closures stay valid

    def __getattr__(self, attr: str):
        entry = self._link.calls["k"].get(attr)
        if entry is None or attr.startswith("_"):
            raise AttributeError(f"k.{attr} is not available to a spawned program "
                                 "(it runs in its own process; see kmm.runtime.child_program)")
        if entry["kind"] in ("property", "setter"):
            return self._link.call("k." + attr)
        return _bound(self._link, "k." + attr, entry["kind"], [])

    async def parallel(self, *fns) -> list:
        """Each fns[i](cpu) in its own process, as its own CPU actor (see module)."""
        return self._link.parallel(fns)


def _bound(link: Link, method: str, kind: str, lead: list):
    if kind == "async":
        async def call(*args, **kwargs):
            return link.call(method, lead + list(args), kwargs)
    else:
        def call(*args, **kwargs):
            return link.call(method, lead + list(args), kwargs)
    call.__name__ = method
    return call


class ProcProxy:
    """A process as seen from one CPU, in a spawned program (a handle on the owner's)."""

    def __init__(self, k: KernelProxy, tid: int, cpu: int, name: str) -> None:
        self.k = k
        self._tid = tid
        self.cpu = cpu
        self.name = name

    def on(self, cpu: int) -> "ProcProxy":
        return ProcProxy(self.k, self._tid, cpu, self.name)

    def __getattr__(self, attr: str):
        link = _LINK[0]
        entry = link.calls["p"].get(attr)
        if entry is None or attr.startswith("_"):
            raise AttributeError(f"Proc.{attr} is not available to a spawned program")
        lead = [_ext(PROC, [self._tid, self.cpu, self.name])]
        if entry["kind"] in ("property", "setter"):
            return link.call("p." + attr, lead)
        return _bound(link, "p." + attr, entry["kind"], lead)


class MachineView:
    """``k.machine`` in a spawned program: attributes read from the owner's machine.
    Plain values come back as values (``k.machine.sched.now``), objects as further
    views, and a view's sync method can be called (``k.machine.sysfs.write(...)``)."""

    def __init__(self, path: tuple) -> None:
        self._path = path

    @property
    def _link(self) -> Link:
        return _LINK[0]

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return self._value(self._link.call("m.get", [list(self._path) + [attr]]),
                           self._path + (attr,))

    def _value(self, v, path):
        if isinstance(v, tuple) and len(v) == 2 and v[0] == OBJECT:
            return MachineView(path)
        return v

    def __getitem__(self, key):
        return self._value(self._link.call("m.call", [list(self._path) + ["__getitem__"],
                                                      [key]]), self._path + ([key],))

    def __len__(self) -> int:
        return self._link.call("m.call", [list(self._path) + ["__len__"], []])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __call__(self, *args):
        return self._link.call("m.call", [list(self._path), list(args)])


# --- the role ---------------------------------------------------------------------------
def program_role(frames: SyncFrames, argv: list[str]):
    """``program PATH``: the program's ``main(k)``, with ``k`` a KernelProxy."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m kmm.runtime.child program PATH")
    from kmm.runtime.child import Connection, load_object
    conn = Connection(frames, "main")
    calls = conn.hello()["calls"]
    for name, spec in calls.get("errors", {}).items():
        _ERRORS[name] = load_object(spec)
    link = Link(frames, "main", calls)
    _LINK.append(link)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides; it stops us

    def body():
        mod = _load_program(argv[0])
        try:
            value = drive(mod.main(KernelProxy()))
        except BrokenPipeError:
            _exit(0)
        frames.send(Bye("main", encode(value, _handle)))
        raise SystemExit(0)  # Bye sent: the child's main must not send another

    return conn, body


def _load_program(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("kmm_program", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: cannot load as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ROLES = {"program": program_role}
