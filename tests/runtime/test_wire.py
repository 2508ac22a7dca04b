"""kmm.runtime.wire: frames round-trip; a frame too large, truncated, undecodable or not
a record is a WireError naming the peer."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
import trio
import trio.testing

from kmm.runtime.msgs import WireError
from kmm.runtime.wire import MAX_FRAME, Call, FrameStream, Hello, Reply, SyncFrames, pack


def frames_over_a_pipe(data: bytes) -> SyncFrames:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return SyncFrames(r, -1, "peer")


def test_records_round_trip_both_ways():
    r, w = os.pipe()
    out = SyncFrames(-1, w)
    msgs = [Hello("khugepaged", 12, 1), Call(1, "a", "knob", ["enabled"], {}),
            Reply(1, {"free": 3, "b": b"\x00" * 10, "l": [1, None, 2.5]})]
    for msg in msgs:
        out.send(msg)
    os.close(w)
    inp = SyncFrames(r, -1)
    assert [inp.receive() for _ in msgs] == msgs
    assert inp.receive() is None  # a clean end between frames


@pytest.mark.parametrize("data,error", [
    (struct.pack(">I", MAX_FRAME + 1), "exceeds the 8388608-byte limit"),
    (struct.pack(">I", 10) + b"abc", "stream ended inside a frame"),
    (b"\x00\x00", "stream ended inside a frame"),
    (struct.pack(">I", 1) + b"\xc1", "undecodable frame"),
    (struct.pack(">I", 3) + msgpack.packb([1, 2]), "not a map with a 'kind'"),
])
def test_malformed_frames_are_rejected(data, error):
    with pytest.raises(WireError, match=error):
        frames_over_a_pipe(data).receive()


def test_a_record_with_a_wrong_field_names_it():
    body = msgpack.packb({"kind": "call", "id": "1", "actor": "a", "method": "m",
                          "args": [], "kwargs": {}})
    with pytest.raises(WireError, match=r"peer: call.id: expected int, got str"):
        frames_over_a_pipe(struct.pack(">I", len(body)) + body).receive()
    body = msgpack.packb({"kind": "reply", "id": 1, "value": 0, "extra": 1})
    with pytest.raises(WireError, match=r"reply.extra: unknown field"):
        frames_over_a_pipe(struct.pack(">I", len(body)) + body).receive()


def test_an_oversized_record_is_refused_on_send():
    with pytest.raises(WireError, match="exceeds"):
        pack(Reply(1, b"x" * (MAX_FRAME + 1)))


async def test_frame_stream_reads_frames_split_anywhere():
    send, recv = trio.testing.memory_stream_one_way_pair()
    stream = FrameStream(None, recv, "child")
    data = pack(Hello("x", 1, 1)) + pack(Reply(2, [1, 2]))
    for i in range(len(data)):  # one byte at a time
        await send.send_all(data[i:i + 1])
    assert await stream.receive() == Hello("x", 1, 1)
    assert await stream.receive() == Reply(2, [1, 2])
    await send.aclose()
    assert await stream.receive() is None
