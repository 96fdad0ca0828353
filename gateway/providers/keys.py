"""A provider's API keys: the one each request goes out with, moved on by a 429, retired by a 401/403.

A provider holds one key (`api_key`) or several (`api_keys`). Every request uses the
ring's `current` key, a plain attribute: the hot path picks no index and builds no
header, since each key's whole request head is encoded once, when the config is
loaded. With several keys, an upstream 429 on the current key makes the next key
current (round robin), so the next request, and the failed one's retry, go out on
another key; a 401 or 403 retires the key it was sent with: it is never used again
until the config is reloaded (a reload builds new adapters, so every key comes back)
or the process restarts, and the retirement is logged at ERROR with the key's place
in the config and its last four characters, never the key. A provider whose keys are
all retired has no `current` key: the router skips its deployments. A single key is
never moved from or retired: its 401s and 403s reach the client as before.

The state is this process's: each worker and replica moves and retires on what its own
requests meet, so a revoked key costs each of them one refused request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger("gateway.providers")

Head = list[tuple[bytes, bytes]]
_HINT_MIN_CHARS = 12  # a shorter key shows no characters at all in its hint


class ProviderKey:
    """One key and the request head that carries it (content type, credential, configured headers)."""

    __slots__ = ("headers", "hint", "secret")

    def __init__(self, secret: str, headers: Head, where: str) -> None:
        self.secret = secret.encode()  # b"": a provider that takes no key (openai_compatible)
        self.headers = headers
        tail = f" (…{secret[-4:]})" if len(secret) >= _HINT_MIN_CHARS else ""
        self.hint = where + tail  # names the key in logs: its place in the config, never its value


class KeyRing:
    __slots__ = ("current", "keys", "provider", "secrets", "several", "usable")

    def __init__(self, provider: str, keys: Sequence[tuple[str, str]], head: Callable[[str], Head]) -> None:
        """`keys`: (secret, its place in the provider's config, e.g. `api_keys[1]`), none for a
        provider that takes no key; `head(secret)` builds a key's request head."""
        self.provider = provider
        where = f"providers.{provider}."
        self.keys = tuple(ProviderKey(s, head(s), where + name) for s, name in keys) or (
            ProviderKey("", head(""), where + "api_key"),
        )
        # One key is never moved from or retired: there is no other to go on with, so its 401s and
        # 403s go to the client as the upstream worded them (a 403 may be about the model, too).
        self.several = len(self.keys) > 1
        self.usable: list[ProviderKey] = list(self.keys)
        self.current: ProviderKey | None = self.keys[0]
        # What error bodies are masked of: an upstream may echo any of them.
        self.secrets = tuple(k.secret for k in self.keys if k.secret)

    def rotate(self, key: ProviderKey) -> None:
        """`key` met a 429: the next request goes out on the next usable key.

        Only while `key` is still current, so the 429s of requests that were in flight together
        on it move the ring one step, not one per request.
        """
        if key is self.current and len(self.usable) > 1:  # (one key: nothing to move to)
            self.current = self.usable[(self.usable.index(key) + 1) % len(self.usable)]

    def retire(self, key: ProviderKey) -> bool:
        """`key` was refused (401/403): never use it again here. False if it was retired already
        or is the provider's only key."""
        if not self.several or key not in self.usable:
            return False
        at = self.usable.index(key)
        self.usable.remove(key)
        if self.current is key:
            self.current = self.usable[at % len(self.usable)] if self.usable else None
        left = len(self.usable)
        log.error(
            "provider %s refused API key %s: retired until the config is reloaded; %s",
            self.provider,
            key.hint,
            f"{left} of {len(self.keys)} keys left" if left else "NO KEY LEFT: its deployments are skipped",
        )
        return True

    def mask(self, text: bytes) -> bytes:
        """`text` with every key of this provider masked."""
        for secret in self.secrets:
            text = text.replace(secret, b"***")
        return text
