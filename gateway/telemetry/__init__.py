"""What the gateway says about each request: request ids, the access log, metrics, log set-up.

Open `access_log.py` first: at each request's end it writes the JSON line and
records the request's metrics (`metrics.py`: one row of plain counts per kind
of request). `exposition.py` serves GET /metrics, each metric a view of the
rows (`views.py`); `scrape.py` adds the gauges read at scrape time
and the other workers' counts (`workers.py`); `server.py` is the separate
metrics port; `settings.py` the config section. `request_id.py` names each
request and turns an unhandled error into a clean 500; `logs.py` sets up
logging with secrets masked.
"""
