"""What the gateway says about each request: request ids, the access log, log set-up.

Open `access_log.py` first (one JSON line per request). `request_id.py` names each
request and turns an unhandled error into a clean 500; `logs.py` sets up logging with
secrets masked.
"""
