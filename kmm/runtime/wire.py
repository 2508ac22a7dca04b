"""The wire between processes: msgpack records in length-prefixed frames.

A frame is a 4-byte big-endian length, then that many bytes of one msgpack map: a record
of kmm.runtime.msgs (``kind`` tag, checked fields). Nothing is ever unpickled. A frame
longer than ``MAX_FRAME``, a short read in the middle of a frame, or a map that is not a
known record is a ``WireError`` naming the peer, so a broken child is reported, not
trusted. docs/wire.md is the protocol a daemon written without kmm follows.

Two ends of the same framing: ``FrameStream`` wraps a trio stream (the process that owns
the machine); ``SyncFrames`` wraps a pair of file descriptors (a child, which runs its
actor's code synchronously and needs no event loop).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack

if TYPE_CHECKING:  # the child's end needs no trio: it starts faster without it
    import trio

from kmm.runtime.msgs import WireError, from_dict, message, to_dict

PROTOCOL = 1
MAX_FRAME = 8 << 20  # a store of a whole THP's bytes fits, with room for the envelope
_LEN = struct.Struct(">I")
_LIMITS = dict(raw=False, strict_map_key=True, max_bin_len=MAX_FRAME,
               max_str_len=1 << 20, max_array_len=1 << 20, max_map_len=1 << 16)


# --- the records of the actor protocol (docs/wire.md) ----------------------------------
@message
class Hello:
    """The child's first frame: which actor it plays and which protocol it speaks."""
    kind: ClassVar[str] = "hello"
    actor: str
    pid: int
    protocol: int


@message
class Call:
    """An actor's operation on the machine, executed by the owner at the actor's turn."""
    kind: ClassVar[str] = "call"
    id: int
    actor: str
    method: str
    args: list
    kwargs: dict


@message
class Reply:
    """The operation's value (plain msgpack data)."""
    kind: ClassVar[str] = "reply"
    id: int
    value: Any


@message
class Fault:
    """The operation raised: the exception's type name and message (``error`` kinds are
    listed in docs/wire.md); or, from a child, its own code failed."""
    kind: ClassVar[str] = "fault"
    id: int
    error: str
    message: str


@message
class Bye:
    """The actor's code returned ``value``; the child exits after sending it."""
    kind: ClassVar[str] = "bye"
    actor: str
    value: Any


def plain(value: Any, where: str = "value") -> Any:
    """``value`` as msgpack data: a dataclass becomes a map of its fields, a tuple a list;
    anything else that msgpack cannot carry is a TypeError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, dict):
        return {k: plain(v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), where)
                for f in dataclasses.fields(value)}
    raise TypeError(f"{where}: {type(value).__name__} is not plain data")


def pack(msg) -> bytes:
    try:
        body = msgpack.packb(to_dict(msg), use_bin_type=True)
    except OverflowError as e:  # an int beyond 64 bits: not plain data on the wire
        raise WireError(f"{msg.kind}: cannot be sent ({e})") from None
    if len(body) > MAX_FRAME:
        raise WireError(f"{msg.kind}: frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def unpack(body: bytes, peer: str):
    try:
        d = msgpack.unpackb(body, **_LIMITS)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireError(f"{peer}: undecodable frame ({e})") from None
    try:
        return from_dict(d)
    except WireError as e:
        raise WireError(f"{peer}: {e}") from None


def _length(head: bytes, peer: str) -> int:
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise WireError(f"{peer}: frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return n


class FrameStream:
    """Records over a trio stream (a child's pipe or socket)."""

    def __init__(self, send: trio.abc.SendStream | None, receive: trio.abc.ReceiveStream,
                 peer: str) -> None:
        self.send_stream = send
        self.receive_stream = receive
        self.peer = peer
        self._buf = bytearray()

    async def send(self, msg) -> None:
        await self.send_stream.send_all(pack(msg))

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self.receive_stream.receive_some(1 << 16)
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def receive(self):
        """The next record, or None at a clean end of stream (between frames)."""
        if not await self._fill(_LEN.size):
            if self._buf:
                raise WireError(f"{self.peer}: stream ended inside a frame header")
            return None
        n = _length(bytes(self._buf[:_LEN.size]), self.peer)
        if not await self._fill(_LEN.size + n):
            raise WireError(f"{self.peer}: stream ended inside a {n}-byte frame")
        body = bytes(self._buf[_LEN.size:_LEN.size + n])
        del self._buf[:_LEN.size + n]
        return unpack(body, self.peer)


class SyncFrames:
    """Records over blocking file descriptors: the child's end."""

    def __init__(self, rfd: int, wfd: int, peer: str = "parent") -> None:
        self.rfd, self.wfd, self.peer = rfd, wfd, peer

    def send(self, msg) -> None:
        data = memoryview(pack(msg))
        while data:
            data = data[os.write(self.wfd, data):]

    def _read(self, n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            chunk = os.read(self.rfd, n - len(out))
            if not chunk:
                if out:
                    raise WireError(f"{self.peer}: stream ended inside a frame")
                return None
            out += chunk
        return bytes(out)

    def receive(self):
        head = self._read(_LEN.size)
        if head is None:
            return None
        body = self._read(_length(head, self.peer))
        if body is None:
            raise WireError(f"{self.peer}: stream ended inside a frame")
        return unpack(body, self.peer)
