"""`make bench`: what the gateway adds over a direct call to a zero-delay mock upstream, in one run.

The mock upstream and the load generator (this process) run on CPU 1, the gateway on CPU 0 alone.
Each round starts a fresh gateway, then runs every scenario against the mock directly and through
the gateway back to back, in the opposite order every other round so that drift hits both alike:

  chat_c1    non-stream chat, 1 connection: latency p50/p99
  chat_c32   non-stream chat, 32 connections: throughput, gateway CPU ms per request
  stream_c8  20-chunk SSE streams, 8 connections: TTFB and total p50, gateway CPU ms per stream

Medians over rounds go to one markdown table on stdout, every round's raw numbers to
bench/results/<timestamp>.json (server logs and the generated config in bench/results/<timestamp>/).
Exit status: 0; 1 when a request failed (the run is flagged); 2 when a server did not start or died.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import itertools
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

from bench.loadgen import Validator, build_request, chat_validator, fetch, run_load, sse_validator

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GATEWAY_CPU, LOAD_CPU = 0, 1
DEFAULT_GATEWAY_CMD = "taskset -c 0 .venv/bin/python -m gateway serve --config {config} --port {port}"
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
class Scenario:
    name: str
    concurrency: int
    stream: bool


SCENARIOS = (Scenario("chat_c1", 1, False), Scenario("chat_c32", 32, False), Scenario("stream_c8", 8, True))


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
        self.name, self.log_path = name, log_path
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
        kib = 0
        for pid in self.pids:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            kib += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
        return round(kib / 1024, 1)

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


async def sanity(target: Target, chat: dict[str, Any], events: int) -> dict[str, str]:
    """Untimed checks of the routes the scenarios do not load: "ok" or what went wrong."""
    checks = {
        "models": (target.get("/v1/models"), ok_200),
        "embeddings": (target.post("/v1/embeddings", {"input": ["bench"]}), ok_200),
        "stream_usage": (
            target.post(
                "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
            ),
            sse_validator(events + 1),
        ),
    }
    out = {}
    for name, (request, validate) in checks.items():
        try:
            status, body = await fetch(HOST, target.port, request, REQUEST_TIMEOUT_S)
            err = validate(status, body)
            out[name] = "ok" if err is None else f"{err}: {body[:200]!r}"
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            out[name] = repr(exc)
    return out


def gateway_config(port: int, mock_port: int, key: str, store: str) -> str:
    return f"""\
server: {{host: {HOST}, port: {port}}}
store: {{url: "{store}"}}
auth:
  keys: [{{name: bench, key: {key}, models: [mock-gpt]}}]
providers:
  mock: {{type: openai, base_url: "http://{HOST}:{mock_port}/v1", api_key: sk-mock}}
models:
  - name: mock-gpt
    deployments: [{{provider: mock, model: mock-gpt-upstream}}]
"""


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def bench(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the run like Ctrl-C does: cancel, then main() stops the servers.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    chat = {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
        ],
        "max_tokens": args.chunks,
        "temperature": 0.7,  # not deterministic: a response cache, if on, must not answer it
    }
    events = args.chunks + 3  # role chunk, content chunks, finish chunk, [DONE]
    bodies = {False: chat, True: {**chat, "stream": True}}
    validators = {False: chat_validator, True: sse_validator(events)}

    mock_port = free_port()
    mock = Proc(
        "mock upstream",
        f"taskset -c {LOAD_CPU} {shlex.quote(sys.executable)} -m bench.mock_upstream "
        f"--port {mock_port} --chunks {args.chunks}",
        logs / "mock.log",
    )
    procs.append(mock)
    direct = Target("direct", mock_port, "sk-mock", "mock-gpt-upstream")
    await wait_ready(mock, mock_port, [(direct.get("/v1/models"), ok_200)])
    record["sanity"] = {"direct": await sanity(direct, chat, events)}
    key = "sk-bench-" + secrets.token_hex(16)

    for r in range(args.rounds):
        port = free_port()
        config = logs / "gateway.yaml"
        config.write_text(gateway_config(port, mock_port, key, args.store))
        config.chmod(0o600)
        cmd = args.gateway_cmd.format(config=config, port=port)
        gw = Proc("gateway", cmd, logs / f"gateway-r{r + 1}.log")
        procs.append(gw)
        gateway = Target("gateway", port, key, "mock-gpt")
        startup = await wait_ready(
            gw,
            port,
            [
                (build_request("GET", HOST, port, "/healthz", {}), ok_200),
                (gateway.post("/v1/chat/completions", chat), chat_validator),
            ],
        )
        if LOAD_CPU in gw.cpus():
            progress(f"warning: the gateway may run on CPU {LOAD_CPU} (with the load): {gw.cpus()}")
        order = [direct, gateway] if r % 2 == 0 else [gateway, direct]
        # Read in this order when the window opens, in reverse when it closes: the gateway nearest its edges.
        probes = {
            "machine": machine_busy_s,
            "steal": steal_s,
            "mock": mock.cpu_s,
            "loadgen": time.process_time,
            "gateway": gw.cpu_s,
        }
        rnd: dict[str, Any] = {
            "round": r + 1,
            "order": [t.name for t in order],
            "gateway": {
                "cmd": cmd,
                "pids": gw.pids,
                "cpus": gw.cpus(),
                "startup_s": round(startup, 2),
                "sanity": await sanity(gateway, chat, events),
            },
            "runs": {},
        }
        record["rounds"].append(rnd)
        for sc in SCENARIOS:
            for target in order:
                res = await run_load(
                    HOST,
                    target.port,
                    target.post("/v1/chat/completions", bodies[sc.stream]),
                    validators[sc.stream],
                    concurrency=sc.concurrency,
                    warmup=args.warmup,
                    duration=args.duration,
                    timeout=REQUEST_TIMEOUT_S,
                    probes=probes,
                )
                s = rnd["runs"].setdefault(sc.name, {})[target.name] = res.summary()
                # On two cores anything else running competes with the run: make it visible.
                pct = s["cpu_pct"]
                if pct["machine"] is not None:
                    ours = pct["gateway"] + pct["mock"] + pct["loadgen"]
                    pct["others"] = round(max(0.0, pct["machine"] - ours), 1)
                progress(
                    f"round {r + 1}/{args.rounds} {sc.name:9} {target.name:7}: {s['rps']:9,.0f}/s  "
                    f"p50 {s['latency_ms']['p50']} ms  ttfb p50 {s['ttfb_ms']['p50']} ms  "
                    f"gateway cpu {s['cpu_ms_per_request']['gateway']} ms/req  "
                    f"errors {sum(s['errors'].values())}"
                )
                if not gw.alive():
                    raise BenchError(
                        f"gateway exited ({gw.popen.returncode}) during {sc.name}; "
                        f"{gw.log_path}:\n{gw.tail()}"
                    )
        rnd["gateway"]["rss_hwm_mib"] = gw.hwm_mib()
        gw.stop()
        procs.remove(gw)


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    path: tuple[str, ...]
    fmt: str
    both: bool = True  # False: a gateway-only number
    target: tuple[str, str, float] | None = None  # (column, "<=" or ">=", limit)


ROWS = (
    Row("chat c1 latency p50 (ms)", "chat_c1", ("latency_ms", "p50"), "{:.3f}", target=("added", "<=", 0.5)),
    Row("chat c1 latency p99 (ms)", "chat_c1", ("latency_ms", "p99"), "{:.3f}"),
    Row("chat c32 throughput (req/s)", "chat_c32", ("rps",), "{:,.0f}", target=("gateway", ">=", 4000)),
    Row("chat c32 latency p50 (ms)", "chat_c32", ("latency_ms", "p50"), "{:.3f}"),
    Row(
        "chat c32 gateway CPU (ms/request)",
        "chat_c32",
        ("cpu_ms_per_request", "gateway"),
        "{:.3f}",
        both=False,
        target=("gateway", "<=", 0.25),
    ),
    Row("stream c8 TTFB p50 (ms)", "stream_c8", ("ttfb_ms", "p50"), "{:.3f}"),
    Row("stream c8 total p50 (ms)", "stream_c8", ("latency_ms", "p50"), "{:.3f}"),
    Row("stream c8 throughput (streams/s)", "stream_c8", ("rps",), "{:,.0f}"),
    Row(
        "stream c8 gateway CPU (ms/stream)",
        "stream_c8",
        ("cpu_ms_per_request", "gateway"),
        "{:.3f}",
        both=False,
        target=("gateway", "<=", 0.4),
    ),
)


def _median(rounds: list[dict[str, Any]], row: Row, target: str) -> float | None:
    values = []
    for rnd in rounds:
        v: Any = rnd["runs"].get(row.scenario, {}).get(target)
        for key in row.path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            values.append(float(v))
    return statistics.median(values) if values else None


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per ROWS line: medians over rounds; added and ratio from those medians."""
    rows = []
    for row in ROWS:
        direct = _median(rounds, row, "direct") if row.both else None
        gateway = _median(rounds, row, "gateway")
        added = ratio = None
        if direct is not None and gateway is not None:
            added, ratio = gateway - direct, (gateway / direct if direct else None)
        cell: dict[str, Any] = {
            "metric": row.label,
            "direct": direct,
            "gateway": gateway,
            "added": added,
            "ratio": ratio,
        }
        if row.target:
            column, op, limit = row.target
            value = cell[column]
            cell["target"] = (
                f"{'added' if column == 'added' else ''} {'≤' if op == '<=' else '≥'} {limit:,g}".strip()
            )
            cell["met"] = None if value is None else (value <= limit if op == "<=" else value >= limit)
        rows.append(cell)
    return rows


def render(record: dict[str, Any]) -> str:
    args, rounds = record["args"], record["rounds"]

    def num(v: float | None, fmt: str, sign: bool = False) -> str:
        if v is None:
            return "—"
        text = fmt.format(v)
        if float(text.replace(",", "")) == 0:
            text = fmt.format(0.0)  # not "-0.000"
        return ("+" if sign and not text.startswith("-") else "") + text

    lines = [
        f"Gateway vs direct, {len(rounds)} round(s) x "
        f"({args['warmup']:g} s warm-up + {args['duration']:g} s), "
        f"medians; streams of {args['chunks']} chunks; gateway on CPU {GATEWAY_CPU}, "
        f"mock upstream + load generator on CPU {LOAD_CPU}; "
        f"store `{args['store']}`; `{args['gateway_cmd']}`",
        "",
        "| metric | direct | gateway | added | ratio | target | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for row, c in zip(ROWS, record["summary"], strict=True):
        met = (
            "" if "met" not in c else "no data" if c["met"] is None else "met" if c["met"] else "**not met**"
        )
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        lines.append(
            f"| {c['metric']} | {num(c['direct'], row.fmt)} | {num(c['gateway'], row.fmt)} | "
            f"{num(c['added'], row.fmt, sign=True)} | {ratio} | {c.get('target', '')} | {met} |"
        )
    rss = [r["gateway"]["rss_hwm_mib"] for r in rounds if "rss_hwm_mib" in r["gateway"]]
    lines.append(f"| gateway peak RSS (MiB, VmHWM, max of rounds) | — | {max(rss) if rss else '—'} | | | | |")
    errors = record["errors"]
    lines.append(f"| failed requests (all runs) | {errors['direct']} | {errors['gateway']} | | | | |")
    noise = {
        t: [
            run[t]["cpu_pct"]["others"] + run[t]["cpu_pct"]["steal"]
            for rnd in rounds
            for run in rnd["runs"].values()
            if "others" in run.get(t, {}).get("cpu_pct", {})
        ]
        for t in ("direct", "gateway")
    }
    cells = " | ".join(f"{statistics.median(v):.0f}" if v else "—" for v in noise.values())
    lines.append(f"| noise: other processes' CPU + steal (% of a core, median) | {cells} | | | | |")
    if (worst := max(noise["direct"] + noise["gateway"], default=0.0)) > NOISE_PCT:
        lines += [
            "",
            f"Noisy: other processes and hypervisor steal took up to {worst:.0f}% of a core during a "
            "measurement (cpu_pct.others and cpu_pct.steal in the JSON); rerun on a quiet machine.",
        ]
    if record["flagged"]:
        lines += ["", f"**FLAGGED**: {record['flagged']}"]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        description="gateway vs direct call against a zero-delay mock upstream "
        "(options also from BENCH_* environment variables)"
    )
    ap.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", "3")))
    ap.add_argument(
        "--duration",
        type=float,
        default=float(env("BENCH_DURATION", "8")),
        help="measured seconds per scenario and target",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=float(env("BENCH_WARMUP", "3")),
        help="discarded seconds before each measurement",
    )
    ap.add_argument(
        "--chunks", type=int, default=int(env("BENCH_CHUNKS", "20")), help="content chunks per stream"
    )
    ap.add_argument(
        "--store", default=env("BENCH_STORE", "memory://"), help="store.url of the gateway config"
    )
    ap.add_argument(
        "--gateway-cmd",
        default=env("BENCH_GATEWAY_CMD", DEFAULT_GATEWAY_CMD),
        help="bash command, run from the repo root; {config} and {port} are filled in; "
        "pin it to CPU 0 yourself (default: %(default)s)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        default=env("BENCH_QUICK", "0") not in ("", "0"),
        help="smoke run: 1 round, 1 s warm-up, 2 s per scenario",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.duration = 1, 1.0, 2.0
    return args


def main() -> int:
    args = parse_args()
    if not {GATEWAY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(
            f"needs CPUs {GATEWAY_CPU} and {LOAD_CPU}, has {sorted(os.sched_getaffinity(0))}",
            file=sys.stderr,
        )
        return 2
    os.sched_setaffinity(0, {LOAD_CPU})  # the load generator runs in this process
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results"
    if (results / stamp).exists():  # two runs in the same second
        stamp += f"-{os.getpid()}"
    logs = results / stamp
    logs.mkdir(parents=True)
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
        "host": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
        },
        "rounds": [],
    }
    procs: list[Proc] = []
    status = 0
    t0 = time.monotonic()
    try:
        uvloop.run(bench(args, logs, record, procs))
    except BenchError as exc:
        record["aborted"] = str(exc)
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        record["aborted"] = "interrupted"
        status = 130
    finally:
        for proc in reversed(procs):
            proc.stop()
    record["elapsed_s"] = round(time.monotonic() - t0, 1)
    record["errors"] = {
        t: sum(
            sum(run[t]["errors"].values())
            for rnd in record["rounds"]
            for run in rnd["runs"].values()
            if t in run
        )
        for t in ("direct", "gateway")
    }
    failed = sum(record["errors"].values())
    reasons = [record["aborted"].partition("\n")[0]] if "aborted" in record else []
    if failed:
        reasons.append(f"{failed} failed request(s), see the JSON")
    record["flagged"] = "; ".join(reasons)
    record["summary"] = summarize(record["rounds"])
    out = results / f"{stamp}.json"
    out.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    if record["rounds"]:
        print(render(record))
    progress(
        f"raw numbers: {out.relative_to(ROOT)}; logs: {logs.relative_to(ROOT)}/; {record['elapsed_s']} s"
    )
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
