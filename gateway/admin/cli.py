"""`gateway keys ...`: a thin client of the admin API (httpx: off the hot path)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

_LIMITS = ("rpm", "tpm", "rpd", "concurrency", "budget_usd", "budget_period")


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k in _LIMITS if (v := getattr(args, k)) is not None}


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.name is not None:
        spec["name"] = args.name
    if args.models is not None:
        spec["models"] = [m for m in args.models.split(",") if m]
    if limits := _limits(args):
        spec["limits"] = limits
    if args.owner:
        spec["owner"] = dict(item.split("=", 1) for item in args.owner)
    return spec


def _call(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    base = "/admin/keys"
    match args.action:
        case "list":
            return "GET", base, None
        case "show":
            return "GET", f"{base}/{args.id}", None
        case "create":
            spec = _spec(args)
            if args.expires_in_s is not None:
                spec["expires_in_s"] = args.expires_in_s
            return "POST", base, spec
        case "update":
            spec = _spec(args)
            if args.enabled is not None:
                spec["enabled"] = args.enabled
            return "PATCH", f"{base}/{args.id}", spec
        case "rotate":
            return "POST", f"{base}/{args.id}/rotate", {"grace_s": args.grace_s}
        case _:
            return "DELETE", f"{base}/{args.id}", None


def run(args: argparse.Namespace) -> int:
    admin_key = args.admin_key or os.environ.get("GATEWAY_ADMIN_KEY", "")
    if not admin_key:
        print("no admin key: pass --admin-key or set GATEWAY_ADMIN_KEY", file=sys.stderr)
        return 2
    method, path, body = _call(args)
    try:
        response = httpx.request(
            method,
            args.url.rstrip("/") + path,
            json=body,
            timeout=10,
            headers={"authorization": f"Bearer {admin_key}"},
        )
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {args.url}: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    out = sys.stdout if response.is_success else sys.stderr
    print(json.dumps(response.json(), indent=2), file=out)
    return 0 if response.is_success else 1


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys through the admin API")
    keys.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"))
    keys.add_argument("--admin-key", help="default: $GATEWAY_ADMIN_KEY")
    actions = keys.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every key, without secrets")
    for name in ("show", "revoke"):
        actions.add_parser(name).add_argument("id")
    rotate = actions.add_parser("rotate", help="new secret; the old one lasts --grace-s seconds")
    rotate.add_argument("id")
    rotate.add_argument("--grace-s", type=float, default=0)
    for name in ("create", "update"):
        p = actions.add_parser(name)
        if name == "update":
            p.add_argument("id")
            p.add_argument("--enable", dest="enabled", action="store_const", const=True)
            p.add_argument("--disable", dest="enabled", action="store_const", const=False)
        else:
            p.add_argument("--expires-in-s", type=float)
        p.add_argument("--name", required=name == "create")
        p.add_argument("--models", help="comma-separated aliases or globs")
        for limit in ("rpm", "tpm", "rpd", "concurrency"):
            p.add_argument(f"--{limit}", type=int)
        p.add_argument("--budget-usd", type=float)
        p.add_argument("--budget-period", choices=("day", "month"))
        p.add_argument("--owner", action="append", metavar="KEY=VALUE")
    keys.set_defaults(run=run)
