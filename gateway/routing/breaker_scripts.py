"""The breaker's store scripts: Lua in store/lua/breaker_*.lua, their Python twins here.

The twins run on the memory store and must behave exactly as the Lua does (the
contract tests hold them to it). See gateway/breaker.py for the state machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.store import LocalOps, Script, lua_source

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# Reply: [flag, state, version, opened_at_ms, cooldown_ms, ms until a probe may go, failures, calls].

_ENTRY = re.compile(rb"(\d+):(\d+):(\d+)")


def _now_ms(ops: LocalOps) -> int:
    return int(ops.time() * 1000)


def _load(ops: LocalOps, key: str, now: int, base: int) -> list[Any]:
    raw = ops.get(key)
    if raw is None:
        return [CLOSED, now, 0, base]
    state, version, opened, cooldown = raw.decode().split(" ")
    return [state, int(version), int(opened), int(cooldown)]


def _save(ops: LocalOps, key: str, st: list[Any], state: str, now: int, opened: int, cooldown: int) -> None:
    st[:] = [state, max(st[1] + 1, now + 1), opened, cooldown]
    ops.set(key, f"{state} {st[1]} {opened} {cooldown}".encode())


def _reply(
    ops: LocalOps, flag: int, st: list[Any], now: int, fails: int, calls: int, lease: str
) -> list[Any]:
    remaining = 0
    if st[0] == OPEN:
        remaining = max(0, st[2] + st[3] - now)
    elif st[0] == HALF_OPEN:
        ttl = ops.ttl(lease)
        remaining = 0 if ttl is None else max(0, int(ttl * 1000))
    return [flag, *st, remaining, fails, calls]


def _record_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[Any]:
    fails, calls, window, bucket, threshold = (int(arg) for arg in args[:5])
    rate, min_calls, base = float(args[5]), int(args[6]), int(args[7])
    now = _now_ms(ops)
    st = _load(ops, keys[0], now, base)
    if st[0] != CLOSED:
        return _reply(ops, 0, st, now, 0, 0, keys[2])
    current = now - now % bucket
    kept, total_fails, total_calls, found = [], 0, 0, False
    for match in _ENTRY.findall(ops.get(keys[1]) or b""):
        start, f, c = (int(part) for part in match)
        if start == current:
            f, c, found = f + fails, c + calls, True
        if start > now - window:
            total_fails, total_calls = total_fails + f, total_calls + c
            kept.append(f"{start}:{f}:{c}")
    if not found:
        total_fails, total_calls = total_fails + fails, total_calls + calls
        kept.append(f"{current}:{fails}:{calls}")
    if fails == 0 and calls == 0:
        return _reply(ops, 0, st, now, total_fails, total_calls, keys[2])
    if fails > 0 and (
        total_fails >= threshold
        or (rate > 0 and total_calls >= min_calls and total_fails >= rate * total_calls)
    ):
        _save(ops, keys[0], st, OPEN, now, now, base)
        ops.delete(keys[1])
        return _reply(ops, 1, st, now, total_fails, total_calls, keys[2])
    ops.set(keys[1], ",".join(kept).encode(), (window + bucket) / 1000)
    return _reply(ops, 0, st, now, total_fails, total_calls, keys[2])


def _probe_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[Any]:
    now = _now_ms(ops)
    st = _load(ops, keys[0], now, int(args[1]))
    if st[0] == CLOSED or (st[0] == OPEN and now < st[2] + st[3]):
        return _reply(ops, 0, st, now, 0, 0, keys[1])
    if ops.get(keys[1]) is not None:
        return _reply(ops, 0, st, now, 0, 0, keys[1])
    ops.set(keys[1], b"1", int(args[0]) / 1000)
    if st[0] == HALF_OPEN:
        return _reply(ops, 2, st, now, 0, 0, keys[1])
    _save(ops, keys[0], st, HALF_OPEN, now, st[2], st[3])
    return _reply(ops, 1, st, now, 0, 0, keys[1])


def _settle_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[Any]:
    now = _now_ms(ops)
    mode, base = args[0].decode(), int(args[1])
    st = _load(ops, keys[0], now, base)
    if mode != "reset" and st[0] != HALF_OPEN:
        return _reply(ops, 0, st, now, 0, 0, keys[1])
    ops.delete(keys[1])
    ops.delete(keys[2])
    if mode == "failure":
        _save(ops, keys[0], st, OPEN, now, now, min(st[3] * 2, int(args[2])))
    else:
        _save(ops, keys[0], st, CLOSED, now, 0, base)
    return _reply(ops, 1, st, now, 0, 0, keys[1])


def _script(name: str, local: Callable[[LocalOps, list[str], list[bytes]], Any]) -> Script:
    body = lua_source("gateway.routing", "breaker_common.lua", f"breaker_{name}.lua")
    return Script(f"gateway.breaker.{name}", body, local)


RECORD = _script("record", _record_local)  # KEYS state, window, lease
PROBE = _script("probe", _probe_local)  # KEYS state, lease
SETTLE = _script("settle", _settle_local)  # KEYS state, lease, window
SCRIPTS = (RECORD, PROBE, SETTLE)
