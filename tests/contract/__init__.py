"""The store contract: every backend, one suite.

`STORES` names the fixture (tests/conftest.py) that builds each backend; a class
decorated with `all_stores` runs each of its tests once per backend, each
bounded in time so a hung connection fails the test instead of the run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import pytest

STORES = {
    "memory": pytest.param("memory_store", id="memory"),
    "fakeredis": pytest.param("fakeredis_store", id="fakeredis"),
    "redis": pytest.param("redis_store", marks=pytest.mark.redis, id="redis"),
    "redis-tls": pytest.param("tls_redis_store", marks=pytest.mark.redis, id="redis-tls"),
    "redis-sentinel": pytest.param("sentinel_store", marks=pytest.mark.redis, id="redis-sentinel"),
    "redis-cluster": pytest.param("cluster_store", marks=pytest.mark.redis, id="redis-cluster"),
}
REDIS_STORES = [STORES[name] for name in ("fakeredis", "redis", "redis-tls", "redis-sentinel", "redis-cluster")]

TEST_TIMEOUT_S = 10.0

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, None]])


def bounded(test: F, seconds: float = TEST_TIMEOUT_S) -> F:
    """Fail the async `test` after `seconds` rather than let it hang."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        with anyio.fail_after(seconds):
            await test(*args, **kwargs)

    return run  # type: ignore[return-value]


def within(seconds: float) -> Callable[[F], F]:
    """`bounded` with another bound: room for starting a set-up of several servers and a failover."""
    return lambda test: bounded(test, seconds)


def bounded_tests(cls: C) -> C:
    """Bound every async test of the decorated class in time."""
    for name, member in list(vars(cls).items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, bounded(member))
    return cls


def over(stores: list[Any]) -> Callable[[C], C]:
    """Run every test of the decorated class on each of `stores`, bounded in time."""

    def decorate(cls: C) -> C:
        marked: C = pytest.mark.parametrize("store", stores, indirect=True)(bounded_tests(cls))
        return marked

    return decorate


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (pub/sub delivery is asynchronous on every backend)."""
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.005)


all_stores = over(list(STORES.values()))
redis_stores = over(REDIS_STORES)
