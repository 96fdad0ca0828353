"""Sharing counts between the worker processes of one replica (`gateway serve --workers N`).

A scrape reaches one worker, and must report the sum over all of them. Each
worker writes its whole state (counts and gauges) to its own file in a
directory `gateway serve` makes empty for the run, every `share_interval_s` and
when it stops; the worker a scrape reaches adds the others' files to its own
live counts, after writing its own: what one scrape reported of a worker, every
later scrape (whichever worker answers it) reports at least, so no counter goes
back between scrapes. A file is replaced whole (write, then rename), so a reader
never sees half of one.

A worker that dies leaves its file: its counts stay in the sum, so counters
never go back when uvicorn starts a replacement (which gets a file of its own,
named with a random suffix as pids come back). Its gauges (in flight, pool
connections) go out of the sum at once: each worker holds an flock on its
`.lock` file while it lives, and the kernel releases it when the process dies,
however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from gateway.telemetry.metrics import Counts

log = logging.getLogger("gateway.metrics")

ENV = "GATEWAY_METRICS_DIR"  # set by `gateway serve` for its workers

Gauges = dict[str, dict[tuple[str, ...], float]]


class WorkerShare:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.name = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.path = self.dir / f"{self.name}.json"
        self._lock: int | None = None

    def open(self) -> None:
        """Take this worker's lock: the sign, to the others, that its gauges are live."""
        fd = os.open(self.dir / f"{self.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock: a clean stop reads as a dead worker
            self._lock = None

    def write(self, counts: Counts, gauges: Gauges) -> None:
        state = {**counts.dump(), "gauges": {n: [[*k, v] for k, v in s.items()] for n, s in gauges.items()}}
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_bytes(orjson.dumps(state))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.error("metrics: cannot share this worker's counts in %s: %s", self.dir, exc)

    def others(self) -> tuple[Counts, Gauges, int]:
        """The other workers' counts added up, the gauges of those alive, and how many are alive."""
        total = Counts()
        gauges: Gauges = {}
        alive = 0
        for path in sorted(self.dir.glob("*.json")):
            if path == self.path:
                continue
            try:
                state: dict[str, Any] = orjson.loads(path.read_bytes())
                total.add(Counts.load(state))
            except (OSError, ValueError, TypeError, IndexError, AttributeError) as exc:  # never fail a scrape
                log.warning("metrics: skipping unreadable worker file %s: %r", path.name, exc)
                continue
            if _alive(path.with_suffix(".lock")):
                alive += 1
                for name, rows in state.get("gauges", {}).items():
                    series = gauges.setdefault(name, {})
                    for row in rows:
                        labels = tuple(row[:-1])
                        series[labels] = series.get(labels, 0.0) + row[-1]
        return total, gauges, alive


def _alive(lock: Path) -> bool:
    """Whether a worker holds `lock`: if we can take it, nobody does."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing also drops the lock we may have taken
    return False
