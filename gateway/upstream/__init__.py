"""The hot-path upstream client: pooled HTTP/1.1 keep-alive connections (asyncio + httptools)."""

from gateway.upstream.connection import UpstreamResponse
from gateway.upstream.pool import Timeouts, UpstreamPool

__all__ = ["Timeouts", "UpstreamPool", "UpstreamResponse"]
