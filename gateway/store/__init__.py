"""Shared state behind one interface; the backend is chosen by a URL in config.

Open `base.py` first (`Store`, `Script`: Lua for Redis with a Python twin). `memory.py` is
the embedded default; `redis.py` the Redis backend, whose per-request calls go over the
lean pipelining client in `resp.py`. `url.py` parses the URL forms (TLS options, masking),
`connect.py` builds both clients from one, `sentinel.py` finds the primary, `cluster.py`
routes the lean calls by slot (`slots.py`), `pubsub.py` keeps the subscriptions.
"""

from __future__ import annotations

import re

from gateway.store.base import (
    Call,
    Confirmed,
    LocalOps,
    Script,
    ScriptArg,
    Store,
    StoreError,
    StoreStats,
    Subscription,
    lua_source,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

__all__ = [
    "Call",
    "Confirmed",
    "LocalOps",
    "MemoryStore",
    "RedisStore",
    "Script",
    "ScriptArg",
    "Store",
    "StoreError",
    "StoreStats",
    "Subscription",
    "lua_source",
    "store_from_url",
]

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,15}")


def store_from_url(url: str, *, timeout_s: float = 1.0, max_connections: int = 50) -> Store:
    """The store for `url`: "memory://", or a Redis URL (gateway/store/url.py lists the forms).

    Nothing connects yet (call `ping` to check). An unknown scheme is a ValueError
    that names the scheme only, since the rest of the URL may hold a password.
    """
    scheme, separator, _ = url.partition("://")
    # Only a well-formed scheme is repeated back: a mangled URL might put a password there.
    scheme = scheme.lower() if separator and _SCHEME.fullmatch(scheme) else ""
    if scheme == "memory":
        return MemoryStore()
    if scheme in _REDIS_SCHEMES:
        return RedisStore.from_url(url, timeout_s=timeout_s, max_connections=max_connections)
    raise ValueError(
        f"unsupported store URL scheme {scheme!r}: expected memory://, redis://, rediss://, unix://"
        ", redis+sentinel:// or redis+cluster://"
    )
