"""Pub/sub for the Redis store: one connection, one reader task for every subscription.

The connection is outside the command pool, so a subscription never takes a command
slot, and has no read timeout (an idle subscriber waits indefinitely). When it breaks,
the reader reconnects with a growing backoff and subscribes every channel again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.client import PubSub as DriverPubSub
from redis.exceptions import RedisError

from gateway.store.base import StoreError, Subscription, deliver
from gateway.store.url import redact

logger = logging.getLogger("gateway.store")

_DRIVER_ERRORS = (RedisError, OSError)
# Reconnect backoff: first retry soon (a restart takes well under a
# second), then double up to a ceiling so an outage costs little.
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0


class PubSubHub:
    """The subscriptions of one store, over `client` (which it owns and closes)."""

    def __init__(self, client: Redis, *, timeout_s: float, secrets: Sequence[str]) -> None:
        self._pubsub_client = client
        self._timeout_s = timeout_s
        self._secrets = secrets
        self._handlers: dict[bytes, list[_RedisSubscription]] = {}
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._live: DriverPubSub | None = None
        self._reader: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        """Stop the reader and end every subscription. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for subscriptions in self._handlers.values():
            for subscription in subscriptions:
                subscription.active = False
        self._handlers.clear()
        self._confirmed.clear()
        await self._pubsub_client.aclose()

    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> Subscription:
        """Subscribe, waiting up to `timeout_s` for Redis to confirm (else `StoreError`)."""
        name = channel.encode()
        subscription = _RedisSubscription(self, name, handler)
        subscriptions = self._handlers.get(name)
        if subscriptions is not None:
            subscriptions.append(subscription)
        else:
            self._handlers[name] = [subscription]
            self._confirmed[name] = asyncio.Event()
            if self._reader is None:
                # The reader subscribes every channel in _handlers once connected.
                self._reader = asyncio.create_task(self._read_loop(), name="gateway.store.pubsub")
            elif self._live is not None:
                # A send that fails means the connection broke: the reader notices,
                # reconnects and subscribes every channel, which the wait below sees.
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await self._live.subscribe(name)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._confirmed[name].wait()
        except BaseException as exc:
            # Timed out or cancelled: the caller gets no handle, so nothing may stay subscribed.
            await subscription.aclose()
            if isinstance(exc, TimeoutError):
                raise StoreError(
                    f"redis SUBSCRIBE to {channel!r} not confirmed within {self._timeout_s}s"
                ) from None
            raise
        return subscription

    async def unsubscribe(self, subscription: _RedisSubscription) -> None:
        subscriptions = self._handlers[subscription.channel]
        subscriptions.remove(subscription)
        if subscriptions:
            return
        del self._handlers[subscription.channel]
        del self._confirmed[subscription.channel]
        if self._live is not None:
            # Locally the subscription is already gone (messages for it are dropped);
            # a broken connection is resubscribed without this channel anyway.
            with contextlib.suppress(*_DRIVER_ERRORS):
                await self._live.unsubscribe(subscription.channel)

    async def _read_loop(self) -> None:
        delay = _BACKOFF_MIN_S
        while True:
            pubsub = self._pubsub_client.pubsub()
            try:
                # Reads on this connection have no timeout, so bound the handshake here.
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.connect()  # type: ignore[no-untyped-call]
                # From here subscribe() sends its own SUBSCRIBE; channels added
                # before are in this snapshot (no await in between).
                self._live = pubsub
                if self._handlers:
                    await pubsub.subscribe(*self._handlers)
                delay = _BACKOFF_MIN_S
                while True:
                    message = await pubsub.get_message(timeout=None)
                    kind = message["type"] if message else None
                    if kind == "message":
                        self._dispatch(message["channel"], message["data"])
                    elif kind == "subscribe":
                        event = self._confirmed.get(message["channel"])
                        if event is not None:
                            event.set()
            except _DRIVER_ERRORS as exc:
                logger.warning(
                    "store: redis pub/sub connection lost (%s); reconnecting in %.2fs",
                    redact(f"{type(exc).__name__}: {exc}", self._secrets),
                    delay,
                )
            finally:
                self._live = None
                # Until resubscribed, a new subscribe() must wait for the reconnect.
                for event in self._confirmed.values():
                    event.clear()
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        for subscription in tuple(self._handlers.get(channel, ())):
            if subscription.active:
                deliver(subscription.handler, channel, data)


class _RedisSubscription(Subscription):
    def __init__(self, hub: PubSubHub, channel: bytes, handler: Callable[[bytes], None]) -> None:
        self._hub = hub
        self.channel = channel
        self.handler = handler
        self.active = True

    async def aclose(self) -> None:
        if self.active:
            self.active = False
            await self._hub.unsubscribe(self)
