"""API keys: minted, hashed, stored, looked up, and kept exact on every replica.

A key is `sk-gw-` + 256 random bits. Only its HMAC-SHA256 under the server's
`auth.hash_secret` is kept (locally and in the store), so neither a memory dump
nor the store reveals a key. Every replica holds all records in memory and
answers a lookup with no store round trip; a change is written to the store,
then announced on a channel, and the admin call returns once every replica has
applied it (each acknowledges), so the next request anywhere sees the change.

A write is answered only once the store's replicas have it too (`store.admin_writes`: WAIT, or
WAITAOF): Redis replicates asynchronously, so a write its primary acknowledged can be missing
from the replica a failover promotes, and a revoked key would come back. When the replicas do not
confirm it in time, the change still stands (on the primary and on every gateway replica) but
the admin call answers 503 `write_not_confirmed`, saying so.

Store schema (one hash slot, `{auth}`, so it is Redis Cluster-safe):
    gw:{auth}:keys           hash: key id -> KeyRecord JSON
    gw:{auth}:events         channel: "<nonce> <key id>" after each change
    gw:{auth}:ack:<nonce>    counter: replicas that applied that change (expires)
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence

import msgspec

from gateway.config import AdminWrites, KeyConfig, Limits
from gateway.errors import AuthenticationError, ServiceUnavailable
from gateway.store import Confirmed, Store, StoreError, Subscription

log = logging.getLogger("gateway.keys")

KEY_PREFIX = "sk-gw-"
RECORDS = "gw:{auth}:keys"
EVENTS = "gw:{auth}:events"
ACKS = "gw:{auth}:ack:"
_ACK_WAIT_S = 2.0
_RESYNC_S = 60.0  # full reload: a safety net for messages lost while the store was unreachable


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    name: str
    digest: str  # hex HMAC of the secret; never shown by the admin API
    created_at: float
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}
    expires_at: float | None = None
    enabled: bool = True
    owner: dict[str, str] = {}
    previous_digest: str | None = None  # the rotated-out secret, valid until previous_valid_until
    previous_valid_until: float | None = None
    source: str = "admin"  # or "config": managed in the config file, read-only here

    def public(self) -> dict[str, object]:
        """What the admin API shows: everything but digests."""
        hidden = ("digest", "previous_digest")
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f not in hidden}
        return msgspec.to_builtins(shown)  # type: ignore[no-any-return]


NO_LIMITS = Limits()
CONFIRM_DEFAULTS = AdminWrites()


class WriteNotConfirmed(ServiceUnavailable):
    """An admin write that stands on the store's primary, but that its replicas did not confirm in time."""

    code = "write_not_confirmed"

    @classmethod
    def of(cls, key_id: str, confirmed: Confirmed) -> WriteNotConfirmed:
        return cls(
            f"The change to key '{key_id}' is applied (on the store's primary and on every gateway "
            f"replica) but not confirmed: {confirmed.shortfall()}. A failover of the store's primary "
            "now could undo it: check the key once the store is healthy and repeat the change if so."
        )


class Policy:
    """What one credential may do, as the hot path needs it."""

    __slots__ = (
        "digest",
        "enabled",
        "expires_at",
        "key_id",
        "limits",
        "model_limits",
        "models",
        "name",
        "valid_until",
    )

    def __init__(
        self,
        key_id: str,
        name: str,
        models: frozenset[str],
        *,
        digest: bytes = b"",
        limits: Limits = NO_LIMITS,
        model_limits: Mapping[str, Limits] | None = None,
        enabled: bool = True,
        expires_at: float | None = None,
        valid_until: float | None = None,
    ) -> None:
        self.key_id = key_id
        self.name = name
        self.digest = digest
        self.models = models  # the aliases this credential may use, globs already expanded
        self.limits = limits
        self.model_limits = model_limits or {}  # alias -> this key's limits on it
        self.enabled = enabled
        self.expires_at = expires_at
        self.valid_until = valid_until  # set for a rotated-out secret in its grace period

    @classmethod
    def of(
        cls, record: KeyRecord, digest: bytes, models: frozenset[str], valid_until: float | None = None
    ) -> Policy:
        return cls(
            record.id,
            record.name,
            models,
            digest=digest,
            limits=record.limits,
            model_limits=record.model_limits,
            enabled=record.enabled,
            expires_at=record.expires_at,
            valid_until=valid_until,
        )


_decode_record = msgspec.json.Decoder(KeyRecord).decode
_encode = msgspec.json.Encoder().encode


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    def __init__(
        self,
        store: Store,
        hash_secret: bytes,
        static: Sequence[KeyConfig],
        aliases: Iterable[str],
        admin_writes: AdminWrites = CONFIRM_DEFAULTS,
    ):
        self.store = store
        self._admin_writes = admin_writes
        # Keyed once: a copy per lookup skips hashing the key's pads again (half the HMAC's cost).
        self._keyed = hmac.new(hash_secret, digestmod="sha256")
        self._aliases = list(aliases)
        self._records: dict[str, KeyRecord] = {}
        self._by_digest: dict[bytes, Policy] = {}
        self._static = {r.id: r for r in (self._static_record(k) for k in static)}
        self._events: asyncio.Queue[bytes] = asyncio.Queue()
        self._subscription: Subscription | None = None
        self._worker: asyncio.Task[None] | None = None
        self._rebuild()

    def digest(self, secret: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(secret)
        return mac.digest()

    def _static_record(self, key: KeyConfig) -> KeyRecord:
        return KeyRecord(
            id=f"cfg-{key.name}",
            name=key.name,
            digest=self.digest(key.key.encode()).hex(),
            created_at=0,
            models=key.models,
            limits=key.limits,
            model_limits=key.model_limits,
            source="config",
        )

    def allowed(self, patterns: Iterable[str]) -> frozenset[str]:
        """The configured aliases matching any of `patterns` (globs)."""
        return frozenset(a for a in self._aliases if any(fnmatch.fnmatchcase(a, p) for p in patterns))

    def _rebuild(self) -> None:
        by_digest: dict[bytes, Policy] = {}
        for record in (*self._static.values(), *self._records.values()):
            models = self.allowed(record.models)
            digest = bytes.fromhex(record.digest)
            by_digest[digest] = Policy.of(record, digest, models)
            if record.previous_digest and record.previous_valid_until:
                old = bytes.fromhex(record.previous_digest)
                by_digest[old] = Policy.of(record, old, models, record.previous_valid_until)
        self._by_digest = by_digest  # swapped whole: a lookup never sees a half-built table

    # -- the hot path --------------------------------------------------------

    def lookup(self, secret: bytes) -> Policy | None:
        """The policy of a presented key, or None; an expired key raises (its message says so)."""
        digest = self.digest(secret)
        policy = self._by_digest.get(digest)
        if policy is None or not hmac.compare_digest(policy.digest, digest) or not policy.enabled:
            return None
        now = time.time()
        if policy.valid_until is not None and now >= policy.valid_until:
            return None  # a rotated-out secret past its grace period
        if policy.expires_at is not None and now >= policy.expires_at:
            raise AuthenticationError("This API key has expired.", code="expired_api_key")
        return policy

    # -- replication -----------------------------------------------------------

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._apply_events(), name="gateway.keys.events")
        try:
            self._subscription = await self.store.subscribe(EVENTS, self._events.put_nowait)
            await self.reload()
        except StoreError as exc:
            log.error("keys: store unreachable at start, admin-created keys unavailable until it is: %s", exc)

    async def aclose(self) -> None:
        if self._subscription is not None:
            await self._subscription.aclose()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def reload(self) -> None:
        raw = await self.store.hgetall(RECORDS)
        self._records = {key_id: _decode_record(value) for key_id, value in raw.items()}
        self._rebuild()

    async def _apply_events(self) -> None:
        # One worker applies changes in the order they were announced.
        while True:
            try:
                message = await asyncio.wait_for(self._events.get(), _RESYNC_S)
            except TimeoutError:
                await self._resync()
                continue
            nonce, _, key_id = message.decode().partition(" ")
            try:
                value = await self.store.hget(RECORDS, key_id)
                if value is None:
                    self._records.pop(key_id, None)
                else:
                    self._records[key_id] = _decode_record(value)
                self._rebuild()
                await self.store.incr(ACKS + nonce, ttl_s=60)
            except StoreError as exc:
                log.error("keys: could not apply a change to %s: %s", key_id, exc)

    async def _resync(self) -> None:
        try:
            await self.reload()
        except StoreError as exc:
            log.warning("keys: periodic reload failed: %s", exc)

    async def _announce(self, key_id: str) -> dict[str, int]:
        """Tell every replica; return once all applied it (or after a bounded wait)."""
        nonce = os.urandom(8).hex()
        replicas = await self.store.publish(EVENTS, f"{nonce} {key_id}".encode())
        deadline = time.monotonic() + _ACK_WAIT_S
        applied = 0
        while time.monotonic() < deadline:
            applied = int(await self.store.get(ACKS + nonce) or 0)
            if applied >= replicas:
                break
            await asyncio.sleep(0.005)
        if applied < replicas:
            log.warning("keys: change to %s applied by %d of %d replicas in time", key_id, applied, replicas)
        return {"replicas": replicas, "applied": applied}

    # -- administration ----------------------------------------------------------

    def records(self) -> list[KeyRecord]:
        return [*self._static.values(), *self._records.values()]

    def get(self, key_id: str) -> KeyRecord | None:
        return self._static.get(key_id) or self._records.get(key_id)

    async def save(self, record: KeyRecord) -> dict[str, dict[str, int]]:
        """Store `record`, confirmed by the store's replicas, and apply it on every gateway replica.

        Returns what the answer shows of both; a confirmation short of `store.admin_writes` raises
        `WriteNotConfirmed` once the change is applied everywhere (it stands on the primary).
        """
        confirmed = await self._write(record.id, _encode(record))
        self._records[record.id] = record
        self._rebuild()
        return await self._settle(record.id, confirmed)

    async def remove(self, key_id: str) -> dict[str, dict[str, int]]:
        """Delete a key, as `save` stores one."""
        confirmed = await self._write(key_id, None)
        self._records.pop(key_id, None)
        self._rebuild()
        return await self._settle(key_id, confirmed)

    def _write(self, key_id: str, value: bytes | None) -> Awaitable[Confirmed]:
        writes = self._admin_writes
        return self.store.hset_confirmed(
            RECORDS,
            key_id,
            value,
            replicas=None if writes.replicas == "all" else writes.replicas,
            aof=writes.aof,
            timeout_s=writes.timeout_ms / 1000,
        )

    async def _settle(self, key_id: str, confirmed: Confirmed) -> dict[str, dict[str, int]]:
        propagation = await self._announce(key_id)
        if confirmed.shortfall():
            log.warning("keys: change to %s not confirmed by the store: %s", key_id, confirmed.shortfall())
            raise WriteNotConfirmed.of(key_id, confirmed)
        return {
            "propagation": propagation,
            "durability": {"store_replicas": confirmed.wanted, "confirmed": confirmed.replicas},
        }

    def mint(self) -> tuple[str, str]:
        """A new secret and its digest (hex)."""
        secret = new_secret()
        return secret, self.digest(secret.encode()).hex()
