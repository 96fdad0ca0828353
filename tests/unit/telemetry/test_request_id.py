from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.telemetry.request_id import RequestIdMiddleware
from tests.unit.asgi import call


def plain_scope(path: str, headers=()):  # type: ignore[no-untyped-def]
    return {"type": "http", "path": path, "method": "GET", "headers": list(headers)}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hi"})


def run(app, path="/other", headers=()):  # type: ignore[no-untyped-def]
    mw = RequestIdMiddleware(app, hot_paths={"/hot"})
    return asyncio.run(call(mw, plain_scope(path, headers), [b""]))


def test_fresh_ids_are_unique_and_prefixed() -> None:
    mw = RequestIdMiddleware(hello, hot_paths=set())
    ids = {asyncio.run(call(mw, plain_scope("/x"), [b""])).headers[b"x-request-id"] for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith(b"req_") for i in ids)


@pytest.mark.parametrize(
    ("given", "kept"),
    [(b"abc-123_X.y:z", True), (b"a" * 128, True), (b"a" * 129, False), (b"has space", False), (b"", False),
     (b"\xff\xfe", False)],
)
def test_client_id_kept_only_when_well_formed(given: bytes, kept: bool) -> None:
    got = run(hello, headers=[(b"x-request-id", given)]).headers[b"x-request-id"]
    assert (got == given) is kept


def test_hot_paths_add_their_own_header() -> None:
    async def hot(scope: Any, receive: Any, send: Any) -> None:
        await scope["gateway"].send_error(send, InvalidRequest("bad"))

    result = run(hot, path="/hot")
    assert result.status == 400 and result.headers[b"x-request-id"].startswith(b"req_")


def test_error_responses_on_other_paths_keep_one_id() -> None:
    async def err(scope: Any, receive: Any, send: Any) -> None:
        await scope["gateway"].send_error(send, InvalidRequest("bad"))

    mw = RequestIdMiddleware(err, hot_paths=set())
    sent: list[Any] = []

    async def send(m: Any) -> None:
        sent.append(m)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    asyncio.run(mw(plain_scope("/x"), receive, send))
    names = [n for n, _ in sent[0]["headers"]]
    assert names.count(b"x-request-id") == 1


def test_bug_becomes_openai_500_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("secret-internal-detail")

    with caplog.at_level(logging.ERROR, "gateway.request"):
        result = run(broken, path="/hot")
    assert result.status == 500
    err = result.json()["error"]
    assert err["type"] == "server_error" and "secret-internal-detail" not in result.body.decode()
    assert "Traceback" not in result.body.decode()
    assert "secret-internal-detail" in caplog.text  # the operator still sees it


def test_bug_after_response_started_sends_nothing_more() -> None:
    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    result = run(half)
    assert result.status == 200 and result.body == b""


def test_lifespan_passes_through() -> None:
    seen = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = RequestIdMiddleware(inner, hot_paths=set())
    asyncio.run(mw({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]
