"""The lean client on a Redis Cluster: one lean connection per primary, each call sent to its slot's owner.

The slot map (slots.py) comes from CLUSTER SLOTS, asked of the known primaries, then the
seeds, one at a time. `execute` groups a batch's commands by node and sends the groups
in parallel, one write each; replies come back in the batch's order. Each command comes
with its routing keys: a command's keys must share a slot (else ValueError: a
programming error, not an outage); no keys means any node; None (SCRIPT LOAD) means
every node of the batch, its reply the first error among them or else the first reply.

Topology changes: a MOVED reply updates the slot's owner, refreshes the map in the
background and sends the command to the new owner; an ASK reply sends ASKING and the
command to the target. A TRYAGAIN reply (a multi-key call in a slot being migrated, its
keys split between the two nodes) waits a few milliseconds, doubling, and sends the
command to the slot's owner again. All three mean the command did not run there, so
resending is safe; a call follows up to 16 MOVED or ASK in a row, and waits on TRYAGAIN
within the timeout (an ASK to the importing node may be answered TRYAGAIN until the
migration ends).
A script that touches a key it did not declare in KEYS fails mid-way on a migrating slot
("non local key"), after what it wrote before: that is never resent, so scripts declare
every key. A node that cannot be reached (a connect failure: nothing was sent) has its
group sent again once after a refresh; any other failure (a timeout, a lost connection)
is the caller's StoreError, since the commands may have run, and refreshes the map in the
background: a hung primary is failed over without a word to its clients, and only the map
tells where its slots went. Nodes whose last call failed are asked for the map last.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, cast

from gateway.store.base import StoreError
from gateway.store.resp import ConnectFailed, ReplyError, RespClient, encode
from gateway.store.slots import Address, key_slot, slot_map, slot_of

_ASKING = encode(("ASKING",))
_SLOTS = encode(("CLUSTER", "SLOTS"))
Keys = Sequence[str] | None


class ClusterClient:
    """Routes encoded commands to the primaries of a cluster; see the module docstring."""

    def __init__(
        self,
        seeds: Sequence[Address],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self._seeds = list(seeds)
        self._username, self._password, self._tls = username, password, tls
        self._timeout_s = timeout_s
        self._owners: list[Address | None] | None = None
        self._nodes: dict[Address, RespClient] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._suspects: set[Address] = set()  # nodes whose last call failed, asked for the map last

    def _node(self, address: Address) -> RespClient:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = RespClient(
                host=address[0],
                port=address[1],
                username=self._username,
                password=self._password,
                tls=self._tls,
                timeout_s=self._timeout_s,
            )
        return node

    async def refresh(self) -> None:
        """Load the slot map; one refresh at a time, shared by every caller that asks meanwhile."""
        await asyncio.shield(self._refresh_soon())

    def _refresh_soon(self) -> asyncio.Task[None]:
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._load_map())
            task.add_done_callback(self._refreshed)
        return task

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved: a failed background refresh is retried by the next caller

    async def _load_map(self) -> None:
        known = list(dict.fromkeys(owner for owner in self._owners or () if owner is not None))
        candidates = [*known, *(seed for seed in self._seeds if seed not in known)]
        candidates.sort(key=lambda address: address in self._suspects)  # a hung node last: it costs a timeout
        failures: list[str] = []
        for address in candidates:
            try:
                reply = await self._node(address).execute(_SLOTS)
            except StoreError as exc:
                failures.append(str(exc))
                continue
            if isinstance(reply, ReplyError) or not reply:
                failures.append(f"{address[0]}:{address[1]}: {reply or 'no slots assigned'}")
                continue
            self._owners = slot_map(reply, address[0])
            return
        raise StoreError(f"no cluster node gave the slot map: {'; '.join(failures)}")

    async def owner(self, key: str) -> Address:
        """The primary that serves `key` now."""
        if self._owners is None:
            await self.refresh()
        return self._owner(key_slot(key))

    def _owner(self, slot: int) -> Address:
        assert self._owners is not None
        owner = self._owners[slot]
        if owner is None:
            raise StoreError(f"cluster slot {slot} has no node")
        return owner

    async def execute(self, *commands: bytes, keys: Sequence[Keys] = ()) -> Any:
        """Send `commands` (each routed by its entry in `keys`); one reply, or the list of several."""
        if self._owners is None:
            await self.refresh()
        slots = [_slot(command_keys) for command_keys in keys]
        replies = await self._send(commands, slots, retry=True)
        redirected = [
            i for i, reply in enumerate(replies) if slots[i] not in (None, _EVERY) and _redirection(reply)
        ]
        if redirected:
            broadcasts = [command for command, slot in zip(commands, slots, strict=True) if slot == _EVERY]
            followed = await asyncio.gather(
                *(
                    self._redirected(commands[i], cast("int", slots[i]), replies[i], broadcasts)
                    for i in redirected
                )
            )
            for i, reply in zip(redirected, followed, strict=True):
                replies[i] = reply
        return replies[0] if len(commands) == 1 else replies

    async def _send(self, commands: Sequence[bytes], slots: list[int | None], *, retry: bool) -> list[Any]:
        """One parallel round trip: the commands grouped by owner; broadcasts to every group."""
        groups: dict[Address, list[int]] = {}
        everywhere = [i for i, slot in enumerate(slots) if slot == _EVERY]
        for i, slot in enumerate(slots):
            if slot is not None and slot != _EVERY:
                groups.setdefault(self._owner(slot), []).append(i)
        anywhere = [i for i, slot in enumerate(slots) if slot is None]
        if anywhere:
            groups.setdefault(next(iter(groups), None) or self._owner(0), []).extend(anywhere)
        for indices in groups.values():
            indices[:0] = everywhere
            indices.sort()
        results = await asyncio.gather(
            *(
                self._node(address).execute(*(commands[i] for i in indices))
                for address, indices in groups.items()
            ),
            return_exceptions=True,
        )
        replies: list[Any] = [None] * len(commands)
        unreachable: list[int] = []
        failure: BaseException | None = None
        for (address, indices), result in zip(groups.items(), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, ReplyError):
                # An error reply is a reply (a value); this is the node's failure.
                self._suspects.add(address)
                if isinstance(result, ConnectFailed) and retry:
                    unreachable.extend(i for i in indices if i not in everywhere)
                else:
                    failure = failure or result
                continue
            self._suspects.discard(address)
            group_replies = result if len(indices) > 1 else [result]
            for i, reply in zip(indices, group_replies, strict=True):
                if i in everywhere and replies[i] is not None and not isinstance(reply, ReplyError):
                    continue  # a broadcast keeps its first reply unless a later node refused
                replies[i] = reply
        if failure is not None:
            # A node that timed out or dropped the connection may be hung and failed over already:
            # nothing would redirect us from it, so look at the map again (in the background).
            self._refresh_soon()
            raise failure
        if unreachable:
            # Nothing was sent to that node: after a failover its slots have a new owner.
            await self.refresh()
            again = sorted(set(unreachable))
            retried = await self._send([commands[i] for i in again], [slots[i] for i in again], retry=False)
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        return replies

    async def _redirected(self, command: bytes, slot: int, reply: ReplyError, broadcasts: list[bytes]) -> Any:
        """The reply after following MOVED, ASK and TRYAGAIN (see the module docstring).

        The batch's broadcasts (SCRIPT LOAD) go in front: the new node may not have the script.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        pause = _TRYAGAIN_FIRST_S
        hops = 0  # MOVED and ASK since the last wait: a loop between nodes ends here, a wait by the deadline
        while hops < _MAX_REDIRECTIONS:
            kind, _, rest = str(reply).partition(" ")
            if kind == "TRYAGAIN":
                # The slot is migrating and the call's keys are split between the two nodes: it did
                # not run. Once the keys have moved (or the slot has), the owner answers or redirects.
                if loop.time() + pause > deadline:
                    return reply
                await asyncio.sleep(pause)
                pause = min(pause * 2, _TRYAGAIN_MAX_S)
                prefix: tuple[bytes, ...] = ()
                target = self._owner(slot)
                hops = 0
            elif kind in ("MOVED", "ASK"):
                hops += 1
                host, _, port = rest.partition(" ")[2].rpartition(":")
                target = (host, int(port))
                if kind == "ASK":
                    prefix = (_ASKING,)  # this one call goes to the importing node; the map stays
                else:
                    assert self._owners is not None
                    self._owners[slot] = target
                    self._refresh_soon()
                    prefix = ()
            else:
                return reply
            replies = await self._node(target).execute(*broadcasts, *prefix, command)
            reply = replies[-1] if broadcasts or prefix else replies
            if not _redirection(reply):
                return reply
        return reply

    async def aclose(self) -> None:
        task, self._refreshing = self._refreshing, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for node in self._nodes.values():
            await node.aclose()


_EVERY = -1  # the slot of a broadcast command
# MOVED/ASK a call follows in a row (as redis-py's cluster client); TRYAGAIN waits, doubling, within
# the timeout.
_MAX_REDIRECTIONS = 16
_TRYAGAIN_FIRST_S = 0.005
_TRYAGAIN_MAX_S = 0.05


def _redirection(reply: Any) -> bool:
    """Whether a reply says the call did not run on this node and where to send it, or to wait."""
    return isinstance(reply, ReplyError) and str(reply).startswith(("MOVED ", "ASK ", "TRYAGAIN"))


def _slot(keys: Keys) -> int | None:
    if keys is None:
        return _EVERY
    try:
        return slot_of(keys)
    except ValueError:
        raise ValueError(
            f"a cluster call's keys must share a slot (a hash tag): {', '.join(map(repr, keys))} "
            f"are in slots {sorted({key_slot(key) for key in keys})}"
        ) from None
