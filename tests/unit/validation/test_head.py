"""The head bound: 431 for a header line or a whole head over its bound, 414 for a long request line."""

from __future__ import annotations

import asyncio

import pytest

from gateway.validation.head import HeadLimitMiddleware
from tests.unit.asgi import call, ok_app, scope

LINE, HEAD = 100, 400


def run(headers: list[tuple[bytes, bytes]], *, query: bytes = b"", path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    seen: list[dict] = []  # type: ignore[type-arg]
    app = HeadLimitMiddleware(ok_app(seen), max_line_bytes=LINE, max_head_bytes=HEAD)
    s = scope(path, "POST", headers)
    s["query_string"] = query
    s["raw_path"] = path.encode()
    return asyncio.run(call(app, s, [b"{}"])), seen


def refused(headers: list[tuple[bytes, bytes]], **kw) -> tuple[int, dict]:  # type: ignore[no-untyped-def,type-arg]
    result, seen = run(headers, **kw)
    assert not seen, "nothing inside (auth included) may run"
    assert result.headers[b"content-type"] == b"application/json"
    assert result.headers[b"x-request-id"] == b"req_test"
    error = result.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return result.status, error


def header_of_line(size: int, name: bytes = b"x-pad") -> tuple[bytes, bytes]:
    return name, b"v" * (size - len(name) - 2)  # "name: value"


def test_a_head_within_both_bounds_passes() -> None:
    result, seen = run([header_of_line(LINE), (b"host", b"gw")])
    assert result.status == 200 and seen


def test_a_line_one_byte_over_is_431_naming_the_header() -> None:
    status, error = refused([(b"host", b"gw"), header_of_line(LINE + 1, b"cookie")])
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert "'cookie'" in error["message"] and f"{LINE} bytes" in error["message"]
    assert "vvvv" not in error["message"]  # the value is never echoed


def test_many_small_lines_over_the_total_are_431() -> None:
    # Each line fits; together with the request line they pass HEAD.
    status, error = refused([header_of_line(LINE - 10, b"x-%d" % i) for i in range(5)])
    assert status == 431 and f"limit of {HEAD} bytes" in error["message"]


def test_the_total_counts_the_request_line_and_every_crlf() -> None:
    request_line = len(b"POST /v1/chat/completions HTTP/1.1")
    fixed = request_line + 2 + 2  # its CRLF and the blank line
    room = HEAD - fixed
    lines = [header_of_line(LINE - 2), header_of_line(LINE - 2), header_of_line(LINE - 2)]
    used = sum(len(n) + 2 + len(v) + 2 for n, v in lines)
    last = room - used - 2  # the last header line, its CRLF aside
    result, _ = run([*lines, header_of_line(last)])
    assert result.status == 200
    status, _ = refused([*lines, header_of_line(last + 1)])
    assert status == 431


def test_a_long_request_line_is_414() -> None:
    status, error = refused([], query=b"q=" + b"x" * LINE)
    assert status == 414 and error["code"] == "uri_too_long"


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_other_scopes_pass_untouched(kind: str) -> None:
    seen: list[str] = []

    async def inner(s, receive, send):  # type: ignore[no-untyped-def]
        seen.append(s["type"])

    app = HeadLimitMiddleware(inner, max_line_bytes=1, max_head_bytes=1)
    asyncio.run(app({"type": kind, "headers": [(b"x", b"y" * 100)]}, None, None))  # type: ignore[arg-type]
    assert seen == [kind]
