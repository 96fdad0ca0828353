"""The `metrics` config section (kept beside the metrics code; gateway/config.py embeds it)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class MetricsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # none: open to any scraper (the exposition holds no secret); admin: the admin key is required.
    auth: Literal["none", "admin"] = "none"
    # Serve GET /metrics on this port (every worker binds it with SO_REUSEPORT) instead of the main one.
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    host: str | None = None  # the separate port's address; default server.host
    # Key names used as labels: these only, when listed; else the first `max_key_names` seen. The rest: other.
    key_names: list[str] = []
    max_key_names: Annotated[int, msgspec.Meta(ge=0)] = 100
    # With `--workers N`, how often each worker shares its counts with the one a scrape reaches.
    share_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
