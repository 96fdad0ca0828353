"""From a model alias to an upstream answer: plan, breaker, retries, failover, relay.

Open `forward.py` first (`Forward`: the app at the bottom of the middleware stack).
`router.py` turns an alias into an ordered plan of deployments; `breaker.py` (with
`breaker_scripts.py` and the Lua in `lua/`) keeps each deployment's circuit breaker in
step across replicas; `probes.py` checks open deployments in the background;
`failures.py` shapes an upstream error answer for the client and the log; `heartbeat.py`
keeps a stream waiting for its first token alive through proxies.
"""
