"""The operator's side: the admin HTTP API and the `gateway keys` command that calls it.

Open `api.py` first (key lifecycle, usage, breaker reset, cache purge, reload, all
behind the admin credential); `cli.py` is its command-line client.
"""
