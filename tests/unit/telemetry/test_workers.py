from __future__ import annotations

import multiprocessing
from pathlib import Path

from gateway.telemetry.metrics import Counts
from gateway.telemetry.workers import WorkerShare

ROW = ("chat", "main", "d", "k", 200, False, "")


def counts(requests: float) -> Counts:
    c = Counts()
    c.rows[ROW] = [requests, 0.0, 0.5]
    c.counters["gateway_upstream_retries"][("main", "retry", "503")] = requests
    return c


def test_the_others_add_up_and_only_live_gauges_count(tmp_path: Path) -> None:
    me, live, dead = WorkerShare(tmp_path), WorkerShare(tmp_path), WorkerShare(tmp_path)
    for share in (me, live, dead):
        share.open()
    live.write(counts(3), {"gateway_requests_in_flight": {(): 2.0}})
    dead.write(counts(4), {"gateway_requests_in_flight": {(): 5.0}})
    dead.close()  # as its process ending would release it
    me.write(counts(100), {})  # its own file is never read back: the caller has the live counts
    total, gauges, alive = me.others()
    assert total.rows[ROW] == [7.0, 0.0, 1.0]  # the dead one's stay
    assert total.counters["gateway_upstream_retries"][("main", "retry", "503")] == 7
    assert gauges == {"gateway_requests_in_flight": {(): 2.0}} and alive == 1
    live.close()
    me.close()


def _hold_and_die(directory: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    share = WorkerShare(directory)
    share.open()
    share.write(counts(1), {"gateway_requests_in_flight": {(): 1.0}})
    ready.set()
    # Exits without closing: the kernel drops the lock as it would for a killed worker.


def test_a_worker_that_died_without_closing_reads_as_dead(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_hold_and_die, args=(str(tmp_path), ready))
    child.start()
    child.join(30)
    assert ready.is_set() and child.exitcode == 0
    me = WorkerShare(tmp_path)
    me.open()
    total, gauges, alive = me.others()
    assert alive == 0 and gauges == {}
    assert total.rows[ROW][0] == 1
    me.close()


def test_an_unreadable_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "123-abcd.json").write_bytes(b"{not json")
    (tmp_path / "124-abcd.json").write_bytes(b'{"rows": 3}')
    other = WorkerShare(tmp_path)
    other.open()
    other.write(counts(2), {})
    me = WorkerShare(tmp_path)
    total, _, alive = me.others()
    assert total.rows[ROW][0] == 2 and alive == 1
    other.close()


def test_a_write_into_a_missing_directory_logs_and_goes_on(tmp_path: Path) -> None:
    share = WorkerShare(tmp_path / "gone")
    share.write(counts(1), {})  # no exception: a scrape must never break a worker
    assert not (tmp_path / "gone").exists()
