"""Cluster hash slots (gateway/store/slots.py) against known vectors."""

from __future__ import annotations

import pytest

from gateway.store.slots import SLOTS, crc16, key_slot, slot_map, slot_of


def test_crc16_xmodem_check_value() -> None:
    assert crc16(b"123456789") == 0x31C3  # the CRC16/XMODEM check value, as in the cluster spec
    assert crc16(b"") == 0


@pytest.mark.parametrize(
    "key, slot",
    [
        ("foo", 12182),  # redis.io's CLUSTER KEYSLOT example
        ("somekey", 11058),
        ("foo{}{bar}", 8363),  # an empty tag is no tag: the whole key
        ("foo{{bar}}zap", 4015),  # the tag is "{bar": up to the first } after the first {
        ("foo{bar}{zap}", 5061),  # the first tag only: "bar"
        ("{user1000}.following", 3443),
        ("{user1000}.followers", 3443),
    ],
)
def test_key_slot(key: str, slot: int) -> None:
    assert key_slot(key) == slot
    assert 0 <= slot < SLOTS


def test_empty_tag_hashes_the_whole_key() -> None:
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % SLOTS


def test_slot_of_keys() -> None:
    assert slot_of([]) is None
    assert slot_of(["{t}a", "{t}b"]) == key_slot("t")
    with pytest.raises(ValueError, match="different cluster slots"):
        slot_of(["a", "b"])


def test_slot_map_from_cluster_slots() -> None:
    reply = [
        [0, 1, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.2", 7001, b"id2"]],
        [2, SLOTS - 1, [b"", 7002, b"id3"]],
    ]
    owners = slot_map(reply, "10.0.0.9")
    assert owners[0] == owners[1] == ("10.0.0.1", 7000)
    assert owners[2] == owners[SLOTS - 1] == ("10.0.0.9", 7002)  # no host reported: the node asked
