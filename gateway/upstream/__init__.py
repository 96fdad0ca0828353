"""The hot-path upstream client: pooled HTTP/1.1 keep-alive connections (asyncio + httptools).

Open `pool.py` first (`UpstreamPool`: connect, reuse, bound); `connection.py` is one
connection's protocol, parser and timeouts.
"""

from gateway.upstream.connection import Timeouts, UpstreamResponse
from gateway.upstream.pool import UpstreamPool

__all__ = ["Timeouts", "UpstreamPool", "UpstreamResponse"]
