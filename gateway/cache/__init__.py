"""The exact-match response cache, with identical in-flight requests coalesced across replicas.

Open `middleware.py` first (`CacheMiddleware` on the request path, `ResponseCache` on the
store). `coalesce.py` is the leader/follower protocol over a store stream; `replay.py`
turns a stored answer into the other mode (SSE to JSON and back).
"""
