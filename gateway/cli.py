"""`gateway serve` and `gateway check-config`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence

from gateway import config as config_module
from gateway.admin import cli as admin_cli
from gateway.telemetry.workers import ENV as METRICS_DIR


def _load(path: str, *, warn: bool = True) -> config_module.Config | None:
    try:
        return config_module.load(path, warn=warn)
    except config_module.ConfigError as exc:
        print(f"{path}: invalid config", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return 1
    served = [
        m.name for m in config.models if any(d.provider in config.enabled_providers() for d in m.deployments)
    ]
    print(
        f"{args.path}: ok ({len(served)} of {len(config.models)} models served, {len(config.auth.keys)} keys)"
    )
    if not config.auth.keys:
        print("  note: no API keys configured: every /v1 request will be refused (401)")
    return 0


def serve(args: argparse.Namespace) -> int:
    config = _load(args.config, warn=False)  # each worker warns once as it loads the file
    if config is None:
        return 1
    import uvicorn

    if args.workers > 1 and config.store.url.startswith("memory://"):
        print("warning: with the memory store each worker keeps its own state; use Redis", file=sys.stderr)
    # Workers are separate processes: each rebuilds the app from the file via the factory.
    os.environ["GATEWAY_CONFIG"] = os.path.abspath(args.config)
    # Workers share their metrics through files there, so a scrape sums them; new and empty each run.
    shared = tempfile.TemporaryDirectory(prefix="gateway-metrics-") if args.workers > 1 else None
    with shared or contextlib.nullcontext():
        if shared is not None:
            os.environ[METRICS_DIR] = shared.name
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=args.host or config.server.host,
            port=config.server.port if args.port is None else args.port,
            workers=args.workers,
            loop="uvloop",
            # httptools, bounding a head while it arrives; the bound travels to every worker in
            # uvicorn's own setting for the same thing (the h11 protocol's name for it).
            http="gateway.validation.protocol:BoundedHttpToolsProtocol",
            h11_max_incomplete_event_size=config.server.max_head_bytes,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=30,
        )
        os.environ.pop(METRICS_DIR, None)  # the directory is gone with this block
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="path to the YAML config")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port)")
    p.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")
    p.set_defaults(run=serve)
    p = sub.add_parser("check-config", help="validate a config file and print its problems")
    p.add_argument("path")
    p.set_defaults(run=check_config)
    admin_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args))
