"""Message records (kmm/runtime/msgs.py): the closed registry round-trips through msgpack,
and every malformed frame is a WireError that names what is wrong.

style.md example 7 and tractor's lesson: decoding checks names, types and sizes, never
unpickles, and the first bad frame raises instead of being swallowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from kmm.runtime import msgs, wire  # noqa: F401  (wire's records join the registry)
from kmm.runtime.msgs import REGISTRY, WireError, decode, encode, from_dict, to_dict

SAMPLES = {int: [0, 1, -1, 9, (1 << 63) - 1, -(1 << 63)], str: ["", "thp", "é\u2603"],
           bool: [True, False], bytes: [b"", b"\x00\xff"], float: [0.0, 1.5],
           list: [[], [1, "x", b"\x01"]], dict: [{}, {"addr": 4096}],
           Any: [None, 7, "thp", [1, {"a": b""}]]}


def sample(cls, i: int):
    """An instance of cls with the i-th sample value of each field's type."""
    kw = {}
    for name, tp in cls._types.items():
        vals = SAMPLES[tp]
        kw[name] = vals[i % len(vals)]
    return cls(**kw)


def frame(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def good(kind: str) -> dict:
    return to_dict(sample(REGISTRY[kind], 1))


def test_registry_is_the_closed_set_of_records():
    """Every record is a frozen, slotted dataclass registered under its own kind."""
    assert {"alloc_pages", "free_pages", "page_reply"} <= set(REGISTRY)
    for kind, cls in REGISTRY.items():
        assert cls.kind == kind
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert hasattr(cls, "__slots__")
        assert set(cls._types) == {f.name for f in dataclasses.fields(cls)}
        assert all(tp in SAMPLES for tp in cls._types.values()), cls


def test_a_kind_registers_once():
    class Twice:
        kind = "alloc_pages"
        order: int
    with pytest.raises(TypeError, match="registered twice"):
        msgs.message(Twice)
    assert REGISTRY["alloc_pages"] is msgs.AllocPages


@pytest.mark.parametrize("kind", sorted(REGISTRY))
@pytest.mark.parametrize("i", range(6))
def test_every_message_round_trips(kind, i):
    msg = sample(REGISTRY[kind], i)
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is type(msg) and back == msg
    assert msgpack.unpackb(data, raw=False)["kind"] == kind
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(back, next(iter(msg._types)), 1)


def test_alloc_pages_wire_form():
    """The map a daemon written without kmm would send (docs/wire.md's contract)."""
    msg = msgs.AllocPages(9, "GFP_TRANSHUGE", "thp", 1)
    assert msgpack.unpackb(encode(msg), raw=False) == {
        "kind": "alloc_pages", "order": 9, "gfp": "GFP_TRANSHUGE", "purpose": "thp",
        "alloc_flags": 1}


# ----------------------------------------------------------------- bad frames
def test_unknown_kind():
    with pytest.raises(WireError, match="unknown kind 'alloc_page'"):
        decode(frame({**good("alloc_pages"), "kind": "alloc_page"}))


@pytest.mark.parametrize("kind", [1, None, b"alloc_pages"])
def test_kind_not_a_string(kind):
    with pytest.raises(WireError, match="kind"):
        decode(frame({**good("alloc_pages"), "kind": kind}))


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_missing_field_names_kind_and_field(kind):
    for field in REGISTRY[kind]._types:
        d = good(kind)
        del d[field]
        with pytest.raises(WireError) as ei:
            decode(frame(d))
        assert str(ei.value).startswith(f"{kind}.{field}: missing")


def test_unknown_field_names_kind_and_field():
    with pytest.raises(WireError) as ei:
        decode(frame({**good("free_pages"), "nid": 0}))
    assert str(ei.value).startswith("free_pages.nid: unknown field")


@pytest.mark.parametrize("kind, field, value, got", [
    ("alloc_pages", "order", "9", "str"),
    ("alloc_pages", "order", 9.0, "float"),
    ("alloc_pages", "gfp", 3, "int"),
    ("alloc_pages", "purpose", None, "NoneType"),
    ("free_pages", "pfn", [1], "list"),
    ("page_reply", "pfn", b"\x01", "bytes"),
])
def test_wrong_type_names_kind_and_field(kind, field, value, got):
    with pytest.raises(WireError) as ei:
        decode(frame({**good(kind), field: value}))
    assert str(ei.value) == f"{kind}.{field}: expected {REGISTRY[kind]._types[field].__name__}, got {got}"


@pytest.mark.parametrize("kind, field", [("alloc_pages", "order"), ("free_pages", "pfn"),
                                         ("free_pages", "order"), ("page_reply", "pfn")])
def test_bool_is_not_an_int(kind, field):
    """msgpack has a real bool; Python's bool subclasses int, the decoder must not."""
    with pytest.raises(WireError) as ei:
        decode(frame({**good(kind), field: True}))
    assert str(ei.value) == f"{kind}.{field}: expected int, got bool"


@pytest.mark.parametrize("d", [
    {"kind": "alloc_pages", "order": 0, "gfp": "x" * ((1 << 16) + 1), "purpose": "anon"},
    {"kind": "alloc_pages", "order": 0, "gfp": "GFP", "purpose": b"x" * ((1 << 20) + 1)},
    {"kind": "free_pages", "pfn": list(range((1 << 16) + 1)), "order": 0},
    {"kind": "free_pages", "pfn": 1, "order": 0, **{f"k{i}": 0 for i in range(70)}},
], ids=["str", "bin", "array", "map"])
def test_oversize_is_refused_before_it_is_built(d):
    """Unpacker limits: strings, binaries, arrays and maps past their caps are refused."""
    with pytest.raises(WireError, match="undecodable frame"):
        decode(frame(d))


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x92\x01", b"\xff" * 8, b"\x81\xa4kind", b"not msgpack at all",
    frame(good("page_reply")) + b"\x00",
], ids=["empty", "never-used", "truncated", "noise", "half-map", "text", "trailing"])
def test_garbage_bytes(data):
    with pytest.raises(WireError):
        decode(data)


@pytest.mark.parametrize("value", [[1, 2], 3, "alloc_pages", {"order": 1}])
def test_frame_that_is_not_a_tagged_map(value):
    with pytest.raises(WireError, match="not a map with a 'kind' string"):
        decode(frame(value))


def test_from_dict_checks_the_same_way():
    assert from_dict(good("page_reply")) == sample(msgs.PageReply, 1)
    with pytest.raises(WireError, match="page_reply.pfn"):
        from_dict({"kind": "page_reply", "pfn": False})
