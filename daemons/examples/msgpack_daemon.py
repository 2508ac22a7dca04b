#!/usr/bin/env python3
"""A daemon written without kmm: plain msgpack over stdin/stdout (docs/wire.md).

It plays a minimal khugepaged: every ``--period-ms`` of emulated time, if some mm is
registered for khugepaged and THPs are enabled, it scans ``--pages`` of progress with
the kernel's khugepaged_scan_mm_slot (which collapses what may collapse); it stops after
``--scans`` scans and returns how many SCAN_SUCCEED results it saw.

    kmm run PROGRAM.py --daemon "exec:python daemons/examples/msgpack_daemon.py"

Imports nothing but msgpack and the standard library. Anything it prints must go to
stderr: stdout carries the frames.
"""

import argparse
import os
import struct
import sys

import msgpack

MAX_FRAME = 8 << 20
NAME = "rawpromote"


class Owner:
    """Frames to and from the process that owns the machine."""

    def __init__(self):
        self.rfd, self.wfd = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
        self.next_id = 1
        self.calls = {}

    def send(self, record):
        body = msgpack.packb(record, use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        while data:
            data = data[os.write(self.wfd, data):]

    def _read(self, n):
        out = b""
        while len(out) < n:
            chunk = os.read(self.rfd, n - len(out))
            if not chunk:
                sys.exit(0)  # the owner closed the stream: the run is over
            out += chunk
        return out

    def receive(self):
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_FRAME:
            sys.exit(f"{NAME}: frame of {n} bytes")
        return msgpack.unpackb(self._read(n), raw=False)

    def hello(self):
        self.send({"kind": "hello", "actor": NAME, "pid": os.getpid(), "protocol": 1})
        reply = self.receive()
        self.calls = reply["value"]["calls"]

    def call(self, method, *args):
        cid, self.next_id = self.next_id, self.next_id + 1
        self.send({"kind": "call", "id": cid, "actor": NAME, "method": method,
                   "args": list(args), "kwargs": {}})
        reply = self.receive()
        if reply["kind"] == "fault":
            raise RuntimeError(f"{method}: {reply['error']}: {reply['message']}")
        return reply["value"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--period-ms", type=int, default=10)
    ap.add_argument("--scans", type=int, default=8)
    args = ap.parse_args()
    owner = Owner()
    owner.hello()
    succeeded = 0
    for _ in range(args.scans):
        if owner.call("hugepage_pmd_enabled") and owner.call("khugepaged_has_work"):
            _, result = owner.call("khugepaged_scan_mm_slot", args.pages)
            succeeded += result == "SCAN_SUCCEED"
        owner.call("sleep", args.period_ms * 1_000_000)
    owner.send({"kind": "bye", "actor": NAME, "value": succeeded})


if __name__ == "__main__":
    main()
