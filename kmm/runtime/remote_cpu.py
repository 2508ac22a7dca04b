"""A program's CPU actors in child processes: the owner's side (``kmm run --spawn cpus``).

The program's code runs in a child (kmm.runtime.child_program); every operation it
performs on the machine (``k.process``, ``p.mmap``, ``p.store``, ``k.smaps``, ...) comes
as a ``Call`` tagged with its actor's key and is executed here, in the proxy actor that
holds the CPU actor's place in the scheduler (``main`` for the program's first actor,
``cpuN.M`` for a ``k.parallel`` branch, with the names and CPUs Kernel.parallel gives
in-process), by the very Kernel and Proc methods an in-process program calls. So the
trace is byte-identical whether the CPUs are spawned or not.

Every process of the program's tree reaches the owner through one pipe pair (a branch's
frames are relayed by its parent), so frames of several actors share the stream: a
proxy reads until it finds its own and queues the others for their proxies, which only
the scheduler's order ever consumes. Procs travel as handles (an index into the tasks
this run has shown the child).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import deque
from typing import Any

import msgpack

from kmm.runtime import remote
from kmm.runtime.child_program import FAILED, OBJECT, _ext, decode, encode
from kmm.runtime.remote import CALL_ERRORS, ChildDied, Child
from kmm.runtime.wire import Bye, Call, Fault, Hello, Reply


START_TIMEOUT = 30.0  # wall seconds for the child's Hello

LOCAL = {"parallel", "machine", "on"}  # answered by the child itself


def program_interface(kernel_cls: type, proc_cls: type, errors: tuple) -> dict:
    """What the child's Kernel and Proc proxies may call, and the errors an operation
    raises in the program (``module:Class``: the child imports them by name)."""
    return {"k": {n: e for n, e in remote.interface(kernel_cls).items() if n not in LOCAL},
            "p": {n: e for n, e in remote.interface(proc_cls).items() if n not in LOCAL},
            "errors": {e.__name__: f"{e.__module__}:{e.__qualname__}" for e in errors}}


class ProgramHost:
    """The owner's end of one spawned program: its stream, its actors' queues, the
    tasks its handles name."""

    def __init__(self, k, child: Child, iface: dict, proc_cls: type,
                 errors: tuple) -> None:
        self.k = k
        self.proc_cls = proc_cls
        # raised in the program's code, as in-process (a SIGSEGV, an OOM, a dead
        # process, a bad call); anything else (a kernel BUG, a deadlock) stops the run
        self.errors = CALL_ERRORS + (ProcessLookupError,) + tuple(errors)
        self.child = child
        self.iface = iface
        self.tasks: list = []
        self._tid: dict[int, int] = {}
        self.queues: dict[str, deque] = {}
        self.pids: dict[str, int] = {"main": child.pid}
        self.last_call: dict[str, str] = {}

    # ------------------------------------------------------------- handles
    def handle(self, obj) -> list | None:
        if not isinstance(obj, self.proc_cls):
            return None
        tid = self._tid.get(id(obj.task))
        if tid is None:
            tid = self._tid[id(obj.task)] = len(self.tasks)
            self.tasks.append(obj.task)
        return [tid, obj.cpu, obj.name]

    def proc(self, h):
        tid, cpu, _ = h
        if not (isinstance(tid, int) and 0 <= tid < len(self.tasks)):
            raise ValueError(f"no process handle {tid!r}")
        return self.proc_cls(self.k, self.tasks[tid], cpu)

    # ------------------------------------------------------------- frames
    async def next(self, key: str):
        """The next frame of actor ``key``; frames of other actors wait in their queue."""
        q = self.queues.get(key)
        if q:
            return q.popleft()
        while True:
            msg = await self.child.receive(f"the next operation of {key}")
            owner = getattr(msg, "actor", None) or "main"  # a Fault: the program's own
            if owner == key:
                return msg
            self.queues.setdefault(owner, deque()).append(msg)

    def died(self, key: str, reason: str) -> ChildDied:
        actor = self.k.machine.sched.current
        point = actor.last_op
        last = self.last_call.get(key, "")
        if point:
            last = f"{last} (last preemption point: {point})" if last else point
        held = tuple(h.lock.name for h in actor.held)
        e = ChildDied(actor.name, self.pids.get(key), reason, last, held)
        e.reported = True
        return e

    async def serve(self, key: str) -> Any:
        """Execute actor ``key``'s operations at its turns until its Bye: its value
        (encoded, as it travels on)."""
        try:
            while True:
                msg = await self.next(key)
                if isinstance(msg, Call):
                    self.last_call[key] = msg.method
                    try:
                        value = encode(await self.execute(key, msg), self.handle)
                    except self.errors as e:
                        await self.child.send(Fault(msg.id, type(e).__name__, str(e)))
                        continue
                    await self.child.send(Reply(msg.id, value))
                elif isinstance(msg, Hello):
                    self.pids[key] = msg.pid
                elif isinstance(msg, Bye):
                    v = msg.value
                    if isinstance(v, msgpack.ExtType) and v.code == FAILED:
                        what, detail = msgpack.unpackb(v.data, raw=False)
                        raise self.died(key, detail if what == "died" else
                                        f"failed: {detail}")
                    return v
                elif isinstance(msg, Fault):
                    raise self.died(key, f"failed: {msg.error}: {msg.message}")
                else:
                    raise self.died(key, f"sent an unexpected {msg.kind!r} record")
        except ChildDied as e:
            if getattr(e, "reported", False):
                raise
            raise self.died(key, e.reason) from None

    async def execute(self, key: str, call: Call) -> Any:
        args = decode(call.args, self.proc)
        kwargs = decode(call.kwargs, self.proc)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError(f"{call.method}: args must be a list and kwargs a map")
        if call.method == "parallel":
            return await self.parallel(key, *args)
        if call.method == "m.get":
            return self.machine_get(*args)
        if call.method == "m.call":
            return self.machine_call(*args)
        scope, _, name = call.method.partition(".")
        entry = self.iface.get(scope, {}).get(name)
        if entry is None:
            raise AttributeError(f"no call named {call.method!r}")
        if scope == "k":
            obj = self.k
        else:
            if not args or not isinstance(args[0], self.proc_cls):
                raise TypeError(f"{call.method}: the first argument is a Proc handle")
            obj = args.pop(0)
        if entry["kind"] in ("property", "setter"):
            if args or kwargs:
                raise TypeError(f"{call.method} is a property")
            return getattr(obj, name)
        value = getattr(obj, name)(*args, **kwargs)
        if entry["kind"] == "async":
            value = await value
        return value

    async def parallel(self, key: str, n: int) -> list:
        """Kernel.parallel's actors, each a proxy serving branch ``key/i``."""
        if not isinstance(n, int) or n < 0:
            raise ValueError("parallel: the branch count is a non-negative int")
        k = self.k
        sched = k.machine.sched
        first = len(sched.actors)

        def body(i: int):
            async def run():
                return await self.serve(f"{key}/{i}")
            return run

        return await sched.spawn_and_join(
            [(f"cpu{i % k.cpus}.{first + i}", body(i), i % k.cpus) for i in range(n)])

    # ------------------------------------------------------------- k.machine
    def _walk(self, path) -> Any:
        if not isinstance(path, list) or not all(isinstance(p, (str, list)) for p in path):
            raise TypeError("k.machine: a path of attribute names")
        obj = self.k.machine
        for part in path:
            if isinstance(part, list):  # [key]: an item of a list or dict
                obj = obj[part[0]]
            elif part.startswith("_"):
                raise AttributeError(f"k.machine: {part!r} is private")
            else:
                obj = getattr(obj, part)
        return obj

    def machine_get(self, path) -> Any:
        value = self._walk(path)
        return value if _plain(value) else _ext(OBJECT, path)

    def machine_call(self, path, args) -> Any:
        if not path:
            raise TypeError("k.machine is not callable")
        if path[-1] == "__getitem__":
            value = self._walk(path[:-1])[args[0]]
            if not _plain(value):
                return _ext(OBJECT, path[:-1] + [[args[0]]])
        elif path[-1] == "__len__":
            value = len(self._walk(path[:-1]))
        else:
            value = self._walk(path)(*args)
        if inspect.isawaitable(value):
            getattr(value, "close", lambda: None)()
            raise TypeError(f"k.machine.{'.'.join(path)} is a coroutine: a spawned "
                            "program calls the machine through k and its Procs")
        if not _plain(value):
            raise TypeError(f"k.machine.{'.'.join(path)}: a {type(value).__name__} "
                            "cannot travel to a spawned program")
        return value


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_plain(x) and _plain(y) for x, y in v.items())
    return False


async def run_main(k, path: str, proc_cls: type, errors: tuple = ()) -> Any:
    """Run program ``path``'s ``main(k)`` in a child process, as the current actor (the
    program's first CPU actor); its return value. ``k`` is the program's Kernel,
    ``proc_cls`` its Proc class, ``errors`` the exceptions of operations a program may
    catch (and that a ``k.parallel`` branch returns as its result: SIGSEGV, OOM). The
    child, and every branch it forked, is gone when this returns or raises."""
    m = k.machine
    timeout = getattr(m, "child_timeout", None) or remote.DEFAULT_TIMEOUT
    iface = program_interface(type(k), proc_cls, errors)
    argv = [sys.executable, "-m", "kmm.runtime.child", "program", os.path.abspath(path)]
    # start-up (python, kmm, the program's imports) is not a hang, however short the
    # timeout the run sets for its operations
    child = await remote.open_child(argv, "main", timeout=max(timeout, START_TIMEOUT),
                                    interface=iface,
                                    startup=getattr(m, "child_startup", None))
    child.timeout = timeout
    host = ProgramHost(k, child, iface, proc_cls, errors)
    try:
        value = await host.serve("main")
    finally:
        await child.aclose()
    return decode(value, host.proc)
