"""What every scenario shares: servers in their own sessions, their CPU from /proc, ports, readiness.

The mock upstream and the load generator (the harness process) run on CPU 1, the gateway on CPU 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import orjson

from bench.loadgen import Probe, Validator, build_request, fetch, run_load

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GATEWAY_CPU, LOAD_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
LOG_KEEP_LINES = 200  # per end of a server log
NOISE_PCT = 5.0  # CPU of other processes (% of a core) above which the table calls the run noisy
_libc = ctypes.CDLL(None)


class BenchError(Exception):
    """A server did not start or died: the run cannot go on."""


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    key: str
    model: str

    def post(self, path: str, body: dict[str, Any]) -> bytes:
        return build_request(
            "POST",
            HOST,
            self.port,
            path,
            {"Authorization": f"Bearer {self.key}"},
            orjson.dumps({"model": self.model, **body}),
        )

    def get(self, path: str) -> bytes:
        return build_request("GET", HOST, self.port, path, {"Authorization": f"Bearer {self.key}"})


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: even a SIGKILLed harness leaves no server behind.
    _libc.prctl(1, signal.SIGKILL)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; the command name may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


class Proc:
    """A server in its own session (so process group): it and every child it spawns stop together."""

    def __init__(self, name: str, cmd: str, log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                ["bash", "-c", cmd],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pids = [self.popen.pid]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh_pids(self) -> None:
        """Once the server is up: its whole session (a shell wrapper, uvicorn workers...)."""
        sid = str(self.popen.pid)
        found = [int(d) for d in os.listdir("/proc") if d.isdigit() and (f := _stat(int(d))) and f[3] == sid]
        self.pids = found or [self.popen.pid]

    def cpu_s(self) -> float:
        ticks = 0
        for pid in self.pids:
            if f := _stat(pid):
                ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        return ticks / CLK_TCK

    def hwm_mib(self) -> float:
        """Peak resident memory (VmHWM) summed over the session's processes."""
        return round(self.status_kib("VmHWM") / 1024, 1)

    def status_kib(self, field: str) -> int:
        """A memory field of /proc/<pid>/status (VmRSS, VmHWM...) summed over the session's processes."""
        kib = 0
        for pid in self.pids:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            kib += sum(int(line.split()[1]) for line in lines if line.startswith(field + ":"))
        return kib

    def cpus(self) -> list[int]:
        cpus: set[int] = set()
        for pid in self.pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                cpus |= os.sched_getaffinity(pid)
        return sorted(cpus)

    def tail(self, lines: int = 25) -> str:
        with self.log_path.open("rb") as f:
            last = collections.deque(f, lines)
        return "\n".join("    " + line.decode(errors="replace").rstrip() for line in last)

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_GRACE_S)
            os.killpg(self.popen.pid, signal.SIGKILL)  # a hung leader, or children that outlived it
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            progress(f"warning: {self.name} (pid {self.popen.pid}) survived SIGKILL")
        self._trim_log()

    def _trim_log(self) -> None:
        """An access-log line per request makes ~100 MB a run: keep only the first and last lines."""
        with self.log_path.open("rb") as f:
            head = list(itertools.islice(f, LOG_KEEP_LINES))
            tail: collections.deque[bytes] = collections.deque(maxlen=LOG_KEEP_LINES)
            cut = 0
            for line in f:
                cut += len(tail) == LOG_KEEP_LINES
                tail.append(line)
        if cut:
            self.log_path.write_bytes(b"".join(head) + b"[... %d lines cut ...]\n" % cut + b"".join(tail))


def _cpu_line() -> list[int]:
    """user nice system idle iowait irq softirq steal, in ticks over all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def machine_busy_s() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, _steal = _cpu_line()
    return (user + nice + system + irq + softirq) / CLK_TCK


def steal_s() -> float:
    """Time the hypervisor gave this VM's CPUs to someone else."""
    return _cpu_line()[7] / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ok_200(status: int, body: bytes) -> str | None:
    return None if status == 200 else f"status_{status}"


async def wait_ready(proc: Proc, port: int, checks: list[tuple[bytes, Validator]]) -> float:
    """Polls until every check passes; bounded by READY_TIMEOUT_S. Returns the seconds it took."""
    t0 = time.monotonic()
    last = "no answer yet"
    while True:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited ({proc.popen.returncode}) before it was ready; "
                f"{proc.log_path}:\n{proc.tail()}"
            )
        try:
            for request, validate in checks:
                status, body = await fetch(HOST, port, request, 2.0)
                if err := validate(status, body):
                    raise ValueError(f"{request.split(b' ', 2)[1].decode()}: {err} {body[:300]!r}")
            proc.refresh_pids()
            return time.monotonic() - t0
        except (OSError, TimeoutError, ValueError, httptools.HttpParserError) as exc:
            last = str(exc) or repr(exc)
        if time.monotonic() - t0 > READY_TIMEOUT_S:
            raise BenchError(
                f"{proc.name} not ready after {READY_TIMEOUT_S:.0f} s: {last}; "
                f"{proc.log_path}:\n{proc.tail()}"
            )
        await asyncio.sleep(0.1)


def chat_body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    """The benchmark's chat request: the mock answers `max_tokens` words (streamed: content chunks)."""
    return {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,  # not deterministic: a response cache, if on, must not answer it
        **({"stream": True} if stream else {}),
    }


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def start_mock(logs: Path, procs: list[Proc], name: str, *options: str) -> tuple[Proc, int]:
    """A mock upstream (bench/mock_upstream.py) on the load CPU; returns it once it answers, and its port."""
    port = free_port()
    mock = Proc(
        name,
        f"taskset -c {LOAD_CPU} {shlex.quote(sys.executable)} -m bench.mock_upstream --port {port} "
        + " ".join(map(shlex.quote, options)),
        logs / f"{name}.log",
    )
    procs.append(mock)
    await wait_ready(mock, port, [(Target("direct", port, "sk-mock", "").get("/v1/models"), ok_200)])
    return mock, port


async def start_gateway(
    args: argparse.Namespace,
    logs: Path,
    procs: list[Proc],
    port: int,
    config: str,
    stem: str,
    checks: list[tuple[bytes, Validator]],
) -> tuple[Proc, float]:
    """A gateway with `config` (written to <stem>.yaml) and `args.gateway_cmd`, once every check passes;
    returns it and the seconds it took to get ready."""
    path = logs / f"{stem}.yaml"
    path.write_text(config)
    path.chmod(0o600)
    gw = Proc("gateway", args.gateway_cmd.format(config=path, port=port), logs / f"{stem}.log")
    procs.append(gw)
    checks = [(build_request("GET", HOST, port, "/healthz", {}), ok_200), *checks]
    startup = await wait_ready(gw, port, checks)
    if LOAD_CPU in gw.cpus():
        progress(f"warning: the gateway may run on CPU {LOAD_CPU} (with the load): {gw.cpus()}")
    return gw, startup


def probes(mock: Proc, gw: Proc) -> dict[str, Probe]:
    # Read in this order when the window opens, in reverse when it closes: the gateway nearest its edges.
    return {
        "machine": machine_busy_s,
        "steal": steal_s,
        "mock": mock.cpu_s,
        "loadgen": time.process_time,
        "gateway": gw.cpu_s,
    }


async def measure(
    target: Target,
    body: dict[str, Any],
    validate: Validator,
    concurrency: int,
    args: argparse.Namespace,
    cpu: dict[str, Probe],
) -> dict[str, Any]:
    """One closed-loop measurement of POST /v1/chat/completions: the load generator's summary, with
    `cpu_pct.others`, the machine's busy CPU minus the run's own processes."""
    res = await run_load(
        HOST,
        target.port,
        target.post("/v1/chat/completions", body),
        validate,
        concurrency=concurrency,
        warmup=args.warmup,
        duration=args.duration,
        timeout=REQUEST_TIMEOUT_S,
        probes=cpu,
    )
    s = res.summary()
    # On two cores anything else running competes with the run: make it visible.
    pct = s["cpu_pct"]
    if pct["machine"] is not None:
        pct["others"] = round(max(0.0, pct["machine"] - pct["gateway"] - pct["mock"] - pct["loadgen"]), 1)
    return s


def failed_requests(record: dict[str, Any], scenario: str) -> int:
    """Failed requests over every round of a scenario that keeps `record[scenario]["rounds"]`."""
    rounds = record.get(scenario, {}).get("rounds", [])
    return sum(sum(s["errors"].values()) for rnd in rounds for s in rnd["runs"].values())


def noise(summaries: Iterable[dict[str, Any]]) -> list[float]:
    """Other processes' CPU + hypervisor steal, % of a core, of each measurement."""
    return [s["cpu_pct"]["others"] + s["cpu_pct"]["steal"] for s in summaries if "others" in s["cpu_pct"]]


def noisy(worst: float) -> list[str]:
    """The table's warning lines when a measurement was disturbed."""
    if worst <= NOISE_PCT:
        return []
    return [
        "",
        f"Noisy: other processes and hypervisor steal took up to {worst:.0f}% of a core during a "
        "measurement (cpu_pct.others and cpu_pct.steal in the JSON); rerun on a quiet machine.",
    ]


def report(label: str, s: dict[str, Any]) -> None:
    """One measurement's progress line on stderr."""
    progress(
        f"{label}: {s['rps']:9,.0f}/s  p50 {s['latency_ms']['p50']} ms  ttfb p50 {s['ttfb_ms']['p50']} ms  "
        f"gateway cpu {s['cpu_ms_per_request']['gateway']} ms/req  errors {sum(s['errors'].values())}"
    )


def ensure_alive(proc: Proc, during: str) -> None:
    if not proc.alive():
        raise BenchError(
            f"{proc.name} exited ({proc.popen.returncode}) during {during}; {proc.log_path}:\n{proc.tail()}"
        )
