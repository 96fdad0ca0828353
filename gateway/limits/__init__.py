"""Rate limits, quotas and budgets, decided all or none in one store round trip per request.

Open `middleware.py` first (`RateLimitMiddleware`: admit, answer, settle). `limiter.py`
builds a request's charges and reads the verdict; `specs.py` says what a limit is and
holds the Python twins of the Lua in `lua/` (ADMIT, SETTLE, RECONCILE); `outage.py` decides
while the store is unreachable; `batch.py` sends settlements together; `usage.py` keeps usage
and cost per key and model.
"""
