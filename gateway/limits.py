"""Per-key rate limits: requests per minute and per day, tokens per minute, in one atomic script.

Each limit is a sliding window estimated from two fixed windows (the previous
window's count weighted by how much of it still overlaps, plus the current
count). All of a request's limits are decided together in one script run, on the
store's clock (Redis TIME), and either every counter is charged or none is. Token
limits charge an estimate on admission (prompt characters / 4 + the requested
completion tokens); the answer's real usage corrects it afterwards.

Keys (one hash tag per API key, so the script touches one slot):
`gw:{rl:<key id>}:<limit>:<window number>`, expiring after two windows.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from gateway.config import Limits
from gateway.store import LocalOps, Script, Store, StoreError

log = logging.getLogger("gateway.limits")

MINUTE_MS, DAY_MS = 60_000, 86_400_000
DEFAULT_COMPLETION_TOKENS = 256


def _admit_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    now = int(ops.time() * 1000)
    prefix = keys[0]
    specs = [
        (args[i].decode(), int(args[i + 1]), int(args[i + 2]), int(args[i + 3]))
        for i in range(0, len(args), 4)
    ]
    admitted, refused, reset = 1, 0, 0
    out: list[int] = []
    states = []
    for index, (name, limit, window, cost) in enumerate(specs):
        number = now // window
        elapsed = now - number * window
        current_key = f"{prefix}:{name}:{number}"
        current = int(ops.get(current_key) or b"0")
        previous = int(ops.get(f"{prefix}:{name}:{number - 1}") or b"0")
        used = previous * (window - elapsed) // window + current
        states.append((current_key, window, cost))
        if used + cost > limit and admitted:
            admitted, refused, reset = 0, index + 1, window - elapsed
        out += [max(0, limit - used - cost), window - elapsed]
    if admitted:
        for current_key, window, cost in states:
            ops.incr(current_key, cost)
            ops.expire(current_key, 2 * window / 1000)
    return [admitted, refused, reset, *out]


# KEYS[1]: the key's prefix. ARGV: (name, limit, window ms, cost) per limit.
# Reply: [admitted, 1-based index of the refusing limit or 0, its ms to reset,
#         then per limit: remaining, ms to reset]
ADMIT = Script(
    "gateway.rate_admit",
    lua="""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local admitted, refused, reset = 1, 0, 0
local out = {}
local charges = {}
for i = 1, #ARGV, 4 do
  local name, limit, window, cost = ARGV[i], tonumber(ARGV[i+1]), tonumber(ARGV[i+2]), tonumber(ARGV[i+3])
  local number = math.floor(now / window)
  local elapsed = now - number * window
  local current_key = KEYS[1] .. ':' .. name .. ':' .. number
  local current = tonumber(redis.call('GET', current_key) or '0')
  local previous = tonumber(redis.call('GET', KEYS[1] .. ':' .. name .. ':' .. (number - 1)) or '0')
  local used = math.floor(previous * (window - elapsed) / window) + current
  charges[#charges + 1] = {current_key, window, cost}
  if used + cost > limit and admitted == 1 then
    admitted, refused, reset = 0, (i + 3) / 4, window - elapsed
  end
  out[#out + 1] = math.max(0, limit - used - cost)
  out[#out + 1] = window - elapsed
end
if admitted == 1 then
  for _, c in ipairs(charges) do
    redis.call('INCRBY', c[1], c[3])
    redis.call('PEXPIRE', c[1], 2 * c[2])
  end
end
table.insert(out, 1, reset)
table.insert(out, 1, refused)
table.insert(out, 1, admitted)
return out
""",
    local=_admit_local,
)


def _adjust_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    window = int(args[1])
    key = f"{keys[0]}:{int(ops.time() * 1000) // window}"
    value = ops.incr(key, int(args[0]))
    if value < 0:
        ops.set(key, b"0")
        value = 0
    ops.expire(key, 2 * window / 1000)
    return value


# KEYS[1]: `<prefix>:tpm`. ARGV: token delta, window ms. Corrects the current window by the real usage.
ADJUST = Script(
    "gateway.rate_adjust",
    lua="""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1] .. ':' .. math.floor(now / tonumber(ARGV[2]))
local value = redis.call('INCRBY', key, ARGV[1])
if value < 0 then redis.call('SET', key, 0); value = 0 end
redis.call('PEXPIRE', key, 2 * tonumber(ARGV[2]))
return value
""",
    local=_adjust_local,
)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt characters / 4: a fast stand-in for a tokenizer."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input") or ""
    chars = len(orjson.dumps(prompt)) if not isinstance(prompt, str) else len(prompt)
    return chars // 4


def estimate_tokens(body: dict[str, Any]) -> int:
    """The prompt's estimate plus the completion tokens asked for."""
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS
    return estimate_prompt_tokens(body) + (
        completion if isinstance(completion, int) else DEFAULT_COMPLETION_TOKENS
    )


class Decision:
    __slots__ = ("admitted", "estimate", "headers", "refused", "retry_after_s")

    def __init__(
        self,
        admitted: bool,
        headers: list[tuple[bytes, bytes]],
        refused: str,
        retry_after_s: float,
        estimate: int,
    ) -> None:
        self.admitted = admitted
        self.headers = headers  # OpenAI's x-ratelimit-* headers
        self.refused = refused  # which limit said no
        self.retry_after_s = retry_after_s
        self.estimate = estimate  # tokens charged on admission


class Limiter:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def admit(self, key_id: str, limits: Limits, body: dict[str, Any]) -> Decision | None:
        """One store round trip; None when the key has no limits (or the store is down: fail open)."""
        specs: list[tuple[str, int, int, int]] = []
        estimate = estimate_tokens(body) if limits.tpm else 0
        if limits.rpm:
            specs.append(("rpm", limits.rpm, MINUTE_MS, 1))
        if limits.tpm:
            specs.append(("tpm", limits.tpm, MINUTE_MS, estimate))
        if limits.rpd:
            specs.append(("rpd", limits.rpd, DAY_MS, 1))
        if not specs:
            return None
        args: list[str | int] = [part for spec in specs for part in spec]
        try:
            reply = await self.store.run(ADMIT, [f"gw:{{rl:{key_id}}}"], args)
        except StoreError as exc:
            log.error("rate limits not enforced (store unreachable): %s", exc)
            return None
        admitted, refused, reset_ms = int(reply[0]), int(reply[1]), int(reply[2])
        headers: list[tuple[bytes, bytes]] = []
        for index, (name, limit, _, _) in enumerate(specs):
            remaining, reset = int(reply[3 + 2 * index]), int(reply[4 + 2 * index])
            if name == "rpd" and limits.rpm:
                continue  # OpenAI's headers carry one requests window: the minute, when there is one
            kind = b"requests" if name in ("rpm", "rpd") else b"tokens"
            headers += [
                (b"x-ratelimit-limit-" + kind, b"%d" % limit),
                (b"x-ratelimit-remaining-" + kind, b"%d" % remaining),
                (b"x-ratelimit-reset-" + kind, b"%.3fs" % (reset / 1000)),
            ]
        name = specs[refused - 1][0] if refused else ""
        return Decision(bool(admitted), headers, name, reset_ms / 1000, estimate)

    async def reconcile(self, key_id: str, decision: Decision, actual_tokens: int) -> None:
        """Replace the admission's token estimate by the real count (never below zero overall)."""
        delta = actual_tokens - decision.estimate
        if delta:
            try:
                await self.store.run(ADJUST, [f"gw:{{rl:{key_id}}}:tpm"], [delta, MINUTE_MS])
            except StoreError as exc:
                log.warning("token usage not reconciled for %s: %s", key_id, exc)
