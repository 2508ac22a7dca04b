"""Message records: the only things actors pass to each other.

Each record is a frozen, slotted dataclass with a ``kind`` tag, registered in one closed
registry. ``encode``/``decode`` round-trip a record through msgpack; decoding checks the
kind, the field names and each field's type, and never unpickles anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, get_type_hints

import msgpack

REGISTRY: dict[str, type] = {}


class WireError(ValueError):
    """A malformed message: names the kind and the field at fault."""


def message(cls):
    """Class decorator: make ``cls`` a frozen slotted record and register its kind."""
    cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
    kind = cls.kind
    if kind in REGISTRY:
        raise TypeError(f"message kind {kind!r} registered twice")
    REGISTRY[kind] = cls
    cls._types = {f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    return cls


def to_dict(msg) -> dict[str, Any]:
    d = {f: getattr(msg, f) for f in msg._types}
    d["kind"] = msg.kind
    return d


def from_dict(d: dict[str, Any]):
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise WireError("message: not a map with a 'kind' string")
    cls = REGISTRY.get(d["kind"])
    if cls is None:
        raise WireError(f"message: unknown kind {d['kind']!r}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    for name in cls._types:
        if name not in fields:
            raise WireError(f"{cls.kind}.{name}: missing field")
    for name in fields:
        if name not in cls._types:
            raise WireError(f"{cls.kind}.{name}: unknown field")
    for name, tp in cls._types.items():
        v = fields[name]
        ok = isinstance(v, tp) if isinstance(tp, type) and tp is not Any else True
        if tp is int and isinstance(v, bool):
            ok = False
        if not ok:
            raise WireError(f"{cls.kind}.{name}: expected {tp.__name__}, got {type(v).__name__}")
    return cls(**fields)


def encode(msg) -> bytes:
    return msgpack.packb(to_dict(msg), use_bin_type=True)


def decode(data: bytes):
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=1 << 20,
                            max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=64)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireError(f"message: undecodable frame ({e})") from None
    return from_dict(d)


# --- the page allocator's messages (mm/page_alloc.c entry points) --------------------
@message
class AllocPages:
    """get_page_from_freelist(gfp, order, alloc_flags): reply PageReply(pfn), or pfn
    -1 if no block of the order is free above the watermark alloc_flags names."""
    kind: ClassVar[str] = "alloc_pages"
    order: int
    gfp: str          # the mask as show_gfp_flags prints it: "GFP_TRANSHUGE|__GFP_NORETRY"
    purpose: str      # "anon", "thp", "pgtable", "zero": for the trace
    alloc_flags: int  # ALLOC_WMARK_MIN 0, _LOW 1, _HIGH 2; ALLOC_MIN_RESERVE 0x8, ...


@message
class FreePages:
    """__free_pages(page, order)."""
    kind: ClassVar[str] = "free_pages"
    pfn: int
    order: int


@message
class IsolateFreePage:
    """__isolate_free_page(page, order), for compaction's free scanner: take the free
    block at pfn off the free lists if it is still free at that order. Reply
    PageReply(pfn); pfn -1 if it is not, -2 if the min watermark stops it."""
    kind: ClassVar[str] = "isolate_free_page"
    pfn: int
    order: int


@message
class PageReply:
    kind: ClassVar[str] = "page_reply"
    pfn: int
