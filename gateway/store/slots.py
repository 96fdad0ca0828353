"""Redis Cluster's key space: the hash slot of a key, and which primary serves each slot.

A key's slot is CRC16 (XMODEM: polynomial 0x1021, initial 0) of the key, or of its hash
tag (the text between the first `{` and the next `}`, when not empty), modulo 16384.
Keys sharing a hash tag share a slot, which is how a script's keys stay on one node.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

SLOTS = 16384


def crc16(data: bytes) -> int:
    """CRC16/XMODEM, as Redis Cluster computes it (binascii's CRC-CCITT from 0: the same, in C)."""
    return binascii.crc_hqx(data, 0)


def key_slot(key: str | bytes) -> int:
    """The hash slot of `key`, honouring a `{hash tag}`."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


def slot_of(keys: Sequence[str]) -> int | None:
    """The one slot of `keys` (None for no keys); ValueError when they span slots."""
    if not keys:
        return None
    slot = key_slot(keys[0])
    for key in keys[1:]:
        if key_slot(key) != slot:
            raise ValueError(f"keys {keys[0]!r} and {key!r} are in different cluster slots; use a hash tag")
    return slot


Address = tuple[str, int]


def slot_map(reply: Any, default_host: str) -> list[Address | None]:
    """Each slot's primary, from a CLUSTER SLOTS reply: [[start, end, [host, port, id, ...], replicas…], …].

    A node that reports no host (an empty string) is reached at `default_host`, the node asked.
    """
    owners: list[Address | None] = [None] * SLOTS
    for entry in reply:
        start, end, primary = entry[0], entry[1], entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        address = (host or default_host, int(primary[1]))
        for slot in range(int(start), int(end) + 1):
            owners[slot] = address
    return owners
