"""anthropic adapter: being written."""

from __future__ import annotations

from gateway.providers.base import Adapter, ProviderConfig

ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {}
