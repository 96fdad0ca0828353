from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.providers import Operation
from gateway.validation.middleware import MAX_DEPTH, BodyMiddleware
from tests.unit.asgi import call, ok_app, scope

ROUTES = {"/v1/chat/completions": Operation.chat, "/v1/embeddings": Operation.embeddings,
          "/v1/completions": Operation.completions, "/v1/images/generations": Operation.images}
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def run(body: bytes | list[bytes], path: str = "/v1/chat/completions", headers=(), method="POST", max_bytes=1000):  # type: ignore[no-untyped-def]
    seen: list[dict] = []  # type: ignore[type-arg]
    app = BodyMiddleware(ok_app(seen), routes=ROUTES, max_bytes=max_bytes)
    chunks = body if isinstance(body, list) else [body]
    result = asyncio.run(call(app, scope(path, method, list(headers)), chunks))
    return result, seen


def error(body: bytes | list[bytes], **kw):  # type: ignore[no-untyped-def]
    result, seen = run(body, **kw)
    assert not seen, "the inner app must not run"
    assert result.headers[b"content-type"] == b"application/json"
    assert result.headers[b"x-request-id"] == b"req_test"
    err = result.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return result.status, err


def test_valid_body_reaches_app_parsed_once() -> None:
    result, seen = run([CHAT[:10], CHAT[10:]])
    assert result.status == 200
    ctx = seen[0]["gateway"]
    assert ctx.body["model"] == "m" and ctx.operation is Operation.chat


def test_other_paths_pass_untouched() -> None:
    result, seen = run(b"not json", path="/v1/models", method="GET")
    assert result.status == 200 and seen[0]["gateway"].operation is None


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "could not parse the JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'"text"', None, "must be a JSON object"),
        (b'{"messages": []}', "model", "model parameter"),
        (b'{"model": 5, "messages": []}', "model", "model parameter"),
        (b'{"model": "", "messages": []}', "model", "model parameter"),
        (b'{"model": "m", "messages": "hi"}', "messages", "expected an array, but got a string"),
        (b'{"model": "m", "messages": ["hi"]}', "messages[0]", "expected an object, but got a string"),
        (b'{"model": "m", "messages": []}', "messages", "empty array"),
        (b'{"model": "m", "messages": [{"role": "root", "content": "x"}]}', "messages[0].role", "'root'"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream",
         "expected a boolean, but got a string"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}', "stream_options",
         "expected an object, but got an integer"),
        (b'{"model": "m", "messages": [{"content": "\xff\xfe"}]}', None, "could not parse"),
    ],
)
def test_bad_bodies_are_400(body: bytes, param: str | None, fragment: str) -> None:
    status, err = error(body)
    assert status == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and fragment in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", b'{"model": "e"}', "input"),
        ("/v1/completions", b'{"model": "c"}', "prompt"),
        ("/v1/images/generations", b'{"model": "i"}', "prompt"),
        ("/v1/embeddings", b'{"model": "e", "input": 3}', "input"),
        ("/v1/completions", b'{"model": "c", "prompt": {}}', "prompt"),
        ("/v1/images/generations", b'{"model": "i", "prompt": ["a"]}', "prompt"),
    ],
)
def test_required_field_per_operation(path: str, body: bytes, param: str) -> None:
    status, err = error(body, path=path)
    assert status == 400 and err["param"] == param


def test_deep_nesting_is_400_but_wide_is_fine() -> None:
    deep = b'{"model": "m", "messages": [{"content": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}]}"
    status, err = error(deep)
    assert status == 400 and "nested deeper" in err["message"]
    wide = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": str(i)}]} for i in range(200)]}
    )
    result, _ = run(wide, max_bytes=100_000)
    assert result.status == 200


def test_declared_length_over_limit_is_refused_before_reading() -> None:
    status, err = error(CHAT, headers=[(b"content-length", b"5000")])
    assert status == 413 and err["code"] == "request_too_large"


def test_streamed_body_over_limit_is_413() -> None:
    status, _ = error([b"{" + b" " * 600, b" " * 600 + b"}"])
    assert status == 413


@pytest.mark.parametrize(
    "content_type",
    [b"text/plain", b"text/plain;charset=UTF-8", b"application/x-www-form-urlencoded",
     b"multipart/form-data; boundary=x", b"application/jsonx", b"json", b""],
)
def test_a_body_not_declared_as_json_is_415_before_reading(content_type: bytes) -> None:
    # No body chunk is given: a refusal that waited for it would see the disconnect instead.
    status, err = error([], headers=[(b"content-type", content_type)])
    assert status == 415 and err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"
    assert "application/json" in err["message"]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"application/json")],
        [(b"content-type", b"Application/JSON; charset=utf-8")],
        [(b"content-type", b"application/merge-patch+json")],
        [],  # some clients send JSON without saying so: accepted
    ],
)
def test_json_content_types_and_none_are_accepted(headers: list[tuple[bytes, bytes]]) -> None:
    result, seen = run(CHAT, headers=headers)
    assert result.status == 200 and seen


def test_bad_content_length_is_400() -> None:
    status, err = error(CHAT, headers=[(b"content-length", b"12abc")])
    assert status == 400 and "Content-Length" in err["message"]


def test_wrong_method_is_405() -> None:
    status, err = error(b"", method="GET")
    assert status == 405 and err["code"] == "method_not_allowed"


def test_client_gone_mid_body_sends_nothing() -> None:
    seen: list[dict] = []  # type: ignore[type-arg]
    app = BodyMiddleware(ok_app(seen), routes=ROUTES, max_bytes=1000)

    async def go():  # type: ignore[no-untyped-def]
        from tests.unit.asgi import Result
        s = scope()
        msgs = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
        sent: list = []  # type: ignore[type-arg]

        async def receive():  # type: ignore[no-untyped-def]
            return msgs.pop(0)

        async def send(m):  # type: ignore[no-untyped-def]
            sent.append(m)

        await app(s, receive, send)
        return sent, Result

    sent, _ = asyncio.run(go())
    assert sent == [] and seen == []
