"""Bad input over raw HTTP (the SDK cannot send it), and `gateway check-config` on broken configs.

Every refusal must be OpenAI-shaped JSON with an x-request-id, and nothing may
reach the upstream.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import yaml

from tests.mock_openai import MockOpenAI

from .conftest import (
    ADMIN_KEY,
    SECRETS,
    TEAM_A_KEY,
    UPSTREAM_KEY,
    GatewayFactory,
    GatewayProcess,
    default_config,
)

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
MAX_BODY_BYTES = 1048576
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(module_gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> GatewayProcess:
    return module_gateway_factory(default_config(mock_upstream))


@pytest.fixture
def http(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with gw.http() as client:
        yield client


def assert_refused(
    status: int, headers: httpx.Headers | dict[str, str], body: bytes, expected: int, param: str | None = None
) -> dict[str, Any]:
    assert status == expected, body[:500]
    assert headers["content-type"].startswith("application/json")
    assert headers.get("x-request-id")
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, parsed
    error: dict[str, Any] = parsed["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert b"Traceback" not in body
    for secret in SECRETS:
        assert secret.encode() not in body
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_response_refused(
    response: httpx.Response, expected: int, param: str | None = None
) -> dict[str, Any]:
    return assert_refused(response.status_code, response.headers, response.content, expected, param)


# -- bodies -----------------------------------------------------------------------------------


def post_raw(http: httpx.Client, body: bytes, path: str = CHAT) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model": "gpt-mini", "messages": [', id="truncated"),
        pytest.param(b"{model: gpt-mini}", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"model": "gpt-mini", "messages": []} trailing', id="trailing-garbage"),
    ],
)
def test_malformed_json_is_400(http: httpx.Client, mock_upstream: MockOpenAI, body: bytes) -> None:
    assert_response_refused(post_raw(http, body), 400)
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'[{"model": "gpt-mini"}]', id="array"),
        pytest.param(b'"gpt-mini"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
    ],
)
def test_body_must_be_a_json_object(http: httpx.Client, mock_upstream: MockOpenAI, body: bytes) -> None:
    assert_response_refused(post_raw(http, body), 400)
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(CHAT, {"messages": MESSAGES}, id="chat-missing"),
        pytest.param(CHAT, {"model": 123, "messages": MESSAGES}, id="chat-number"),
        pytest.param(CHAT, {"model": None, "messages": MESSAGES}, id="chat-null"),
        pytest.param(CHAT, {"model": ["gpt-mini"], "messages": MESSAGES}, id="chat-list"),
        pytest.param("/v1/embeddings", {"input": "x"}, id="embeddings-missing"),
        pytest.param(
            "/v1/completions", {"model": {"name": "instruct"}, "prompt": "x"}, id="completions-object"
        ),
    ],
)
def test_model_missing_or_not_a_string_is_400(
    http: httpx.Client, mock_upstream: MockOpenAI, path: str, body: dict[str, Any]
) -> None:
    assert_response_refused(http.post(path, json=body), 400, param="model")
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param("hi", id="string"),
        pytest.param({"role": "user", "content": "hi"}, id="object"),
        pytest.param(None, id="null"),
    ],
)
def test_messages_not_a_list_is_400(http: httpx.Client, mock_upstream: MockOpenAI, messages: Any) -> None:
    response = http.post(CHAT, json={"model": "gpt-mini", "messages": messages})
    assert_response_refused(response, 400, param="messages")
    assert mock_upstream.requests == []


def test_messages_missing_is_400(http: httpx.Client, mock_upstream: MockOpenAI) -> None:
    assert_response_refused(http.post(CHAT, json={"model": "gpt-mini"}), 400, param="messages")
    assert mock_upstream.requests == []


# null is not here: it is "not set", as OpenAI reads it (and the SDK sends it for stream=None).
@pytest.mark.parametrize("stream", ["yes", "true", 1, {"on": True}])
def test_stream_not_a_bool_is_400(http: httpx.Client, mock_upstream: MockOpenAI, stream: Any) -> None:
    response = http.post(CHAT, json={"model": "gpt-mini", "messages": MESSAGES, "stream": stream})
    assert_response_refused(response, 400)
    assert mock_upstream.requests == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"model": "gpt-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}', id="bad-bytes"
        ),
        pytest.param(
            b'{"model": "gpt-mini", "messages": [{"role": "user", "content": "\xc3"}]}', id="truncated"
        ),
        pytest.param(b'{"model": "gpt-\xed\xa0\x80", "messages": []}', id="surrogate"),
    ],
)
def test_invalid_utf8_is_400(http: httpx.Client, mock_upstream: MockOpenAI, body: bytes) -> None:
    assert_response_refused(post_raw(http, body), 400)
    assert mock_upstream.requests == []


def nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "array" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_deeper_than_64_is_400(http: httpx.Client, mock_upstream: MockOpenAI, kind: str) -> None:
    body = {"model": "gpt-mini", "messages": MESSAGES, "metadata": nested(100, kind)}
    assert_response_refused(http.post(CHAT, json=body), 400)
    assert mock_upstream.requests == []


def test_moderate_nesting_is_accepted(http: httpx.Client, mock_upstream: MockOpenAI) -> None:
    body = {"model": "gpt-mini", "messages": MESSAGES, "metadata": nested(10, "object")}
    response = http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert mock_upstream.requests[0].json()["metadata"] == nested(10, "object")


# -- body size ----------------------------------------------------------------------------------


def test_body_over_limit_is_413(http: httpx.Client, mock_upstream: MockOpenAI) -> None:
    filler = "x" * (MAX_BODY_BYTES + 1)
    response = http.post(CHAT, json={"model": "gpt-mini", "messages": [{"role": "user", "content": filler}]})
    assert_response_refused(response, 413)
    assert mock_upstream.requests == []


class EarlyReply:
    """A raw request whose body is sent piece by piece, reading the reply as soon as one comes."""

    def __init__(self, port: int) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sent = 0

    def close(self) -> None:
        self.sock.close()

    def send_head(self, headers: list[tuple[str, str]]) -> None:
        self.sock.sendall(self.conn.send(h11.Request(method="POST", target=CHAT, headers=headers)) or b"")

    def replied(self) -> bool:
        self.sock.setblocking(False)
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5)

    def send_body(self, pieces: Iterator[bytes]) -> None:
        """Send until the server answers (or stops reading): never the end of the body."""
        for piece in pieces:
            if self.replied():
                return
            try:
                self.sock.sendall(self.conn.send(h11.Data(data=piece)) or b"")
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                return
            self.sent += len(piece)

    def read_reply(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)  # a TimeoutError here means no early answer came
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, headers, body


def auth_headers() -> list[tuple[str, str]]:
    return [
        ("host", "127.0.0.1"),
        ("authorization", f"Bearer {TEAM_A_KEY}"),
        ("content-type", "application/json"),
    ]


def test_content_length_over_limit_is_refused_before_the_body(
    gw: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    client = EarlyReply(gw.port)
    try:
        client.send_head([*auth_headers(), ("content-length", str(50 * MAX_BODY_BYTES))])
        client.send_body(iter([b'{"model": "gpt-mini", "messages": "' + b"x" * 1000]))
        status, headers, body = client.read_reply()
    finally:
        client.close()
    assert_refused(status, headers, body, 413)
    assert mock_upstream.requests == []


def test_chunked_body_growing_over_limit_is_refused_before_it_ends(
    gw: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    piece = b"x" * 65536
    pieces = iter([b'{"model": "gpt-mini", "messages": "', *[piece] * (4 * MAX_BODY_BYTES // len(piece))])
    client = EarlyReply(gw.port)
    try:
        client.send_head([*auth_headers(), ("transfer-encoding", "chunked")])
        client.send_body(pieces)
        status, headers, body = client.read_reply()  # the body never ends: only an early reply can come
    finally:
        client.close()
    assert_refused(status, headers, body, 413)
    assert mock_upstream.requests == []


# -- content type and request head ---------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_json_sent_as_another_type_is_415(http: httpx.Client, mock_upstream: MockOpenAI, content_type: str) -> None:
    body = json.dumps({"model": "gpt-mini", "messages": MESSAGES}).encode()
    response = http.post(CHAT, content=body, headers={"content-type": content_type})
    assert assert_response_refused(response, 415)["code"] == "unsupported_media_type"
    assert mock_upstream.requests == []


def test_json_without_a_content_type_is_served(http: httpx.Client, mock_upstream: MockOpenAI) -> None:
    body = json.dumps({"model": "gpt-mini", "messages": MESSAGES}).encode()
    request = http.build_request("POST", CHAT, content=body)
    assert "content-type" not in request.headers  # httpx sends none for raw bytes
    assert http.send(request).status_code == 200


@pytest.mark.parametrize("key", [TEAM_A_KEY, "sk-not-a-real-key-000000000"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-big": "a" * 65536}, id="one-64k-line"),
        pytest.param({f"x-pad-{i}": "a" * 6000 for i in range(6)}, id="36k-of-small-lines"),
    ],
)
def test_an_oversized_head_is_431_before_auth(
    gw: GatewayProcess, mock_upstream: MockOpenAI, key: str, headers: dict[str, str]
) -> None:
    # A bad key still gets 431, not 401: the head is refused before auth runs.
    with gw.http(api_key=key) as client:
        response = client.post(CHAT, json={"model": "gpt-mini", "messages": MESSAGES}, headers=headers)
    error = assert_response_refused(response, 431)
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
    assert "aaaa" not in error["message"]  # a header's value is never echoed
    assert mock_upstream.requests == []


def test_a_head_still_arriving_is_refused_before_it_ends(gw: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    # uvicorn's httptools parser alone would buffer all of it first (seconds of CPU for 64 MiB).
    piece = b"a" * 65536
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sent, reply = 0, b""
    try:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-bad\r\nx-big: ".encode())
        while sent < 64 * len(piece) and not select.select([sock], [], [], 0.05)[0]:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    finally:
        sock.close()
    assert sent < 64 * len(piece), "no answer until the client stopped sending"
    head, _, body = reply.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    error = assert_refused(int(head.split()[1]), headers, body, 431)
    assert error["code"] == "request_header_fields_too_large"
    assert mock_upstream.requests == []


def test_a_head_within_the_bounds_reaches_auth(gw: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    with gw.http(api_key="sk-not-a-real-key-000000000") as client:
        response = client.get("/v1/models", headers={"x-big": "a" * 8000})
    assert_response_refused(response, 401)


# -- routes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings", "/v1/completions", "/v1/images/generations"])
def test_get_on_a_post_route_is_405(http: httpx.Client, mock_upstream: MockOpenAI, path: str) -> None:
    assert_response_refused(http.get(path), 405)
    assert mock_upstream.requests == []


@pytest.mark.parametrize("path", ["/v1/does-not-exist", "/nope", "/v1/chat/completions/extra", "/v2/models"])
def test_unknown_path_is_404(http: httpx.Client, mock_upstream: MockOpenAI, path: str) -> None:
    assert_response_refused(http.post(path, json={"model": "gpt-mini", "messages": MESSAGES}), 404)
    assert_response_refused(http.get(path), 404)
    assert mock_upstream.requests == []


# -- check-config -------------------------------------------------------------------------------


def valid_config() -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 8080, "max_body_bytes": MAX_BODY_BYTES},
        "store": {"url": "memory://"},
        "auth": {
            "admin_key": "${GATEWAY_ADMIN_KEY:-" + ADMIN_KEY + "}",
            "keys": [{"name": "team-a", "key": TEAM_A_KEY, "models": ["gpt-mini"]}],
        },
        "providers": {
            "mock": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": UPSTREAM_KEY}
        },
        "models": [{"name": "gpt-mini", "deployments": [{"provider": "mock", "model": "mock-gpt-upstream"}]}],
    }


def check_config(
    tmp_path: Path, config: dict[str, Any] | str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "E2E_"))}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        env={**environ, **(env or {})},
        timeout=30,
        check=False,
    )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert "Traceback" not in output, output
    for secret in [*SECRETS, *(env or {}).values()]:
        assert secret not in output, output
    return done.returncode, output


def test_check_config_accepts_a_valid_config(tmp_path: Path) -> None:
    code, output = check_config(
        tmp_path, valid_config(), env={"GATEWAY_ADMIN_KEY": "adm-from-env-secret-0123456789"}
    )
    assert code == 0, output


def test_check_config_unknown_provider(tmp_path: Path) -> None:
    config = valid_config()
    config["models"][0]["deployments"][0]["provider"] = "nope-provider"
    code, output = check_config(tmp_path, config)
    assert code != 0
    assert "models[0].deployments[0].provider" in output
    assert "nope-provider" in output


@pytest.mark.parametrize(
    ("where", "field"),
    [
        pytest.param(("server",), "colour", id="server"),
        pytest.param(("providers", "mock"), "api_kye", id="provider"),
        pytest.param(("models", 0, "deployments", 0), "weight_typo", id="deployment"),
    ],
)
def test_check_config_unknown_field(tmp_path: Path, where: tuple[str | int, ...], field: str) -> None:
    config = valid_config()
    node: Any = config
    for step in where:
        node = node[step]
    node[field] = "value"
    code, output = check_config(tmp_path, config)
    assert code != 0
    assert field in output
    for step in where:
        assert str(step) in output, output


def test_check_config_missing_env_var(tmp_path: Path) -> None:
    config = valid_config()
    config["providers"]["mock"]["api_key"] = "${E2E_UPSTREAM_KEY_NOT_SET}"
    code, output = check_config(tmp_path, config)
    assert code != 0
    assert "E2E_UPSTREAM_KEY_NOT_SET" in output


def test_check_config_env_default_is_used(tmp_path: Path) -> None:
    config = valid_config()
    config["providers"]["mock"]["api_key"] = "${E2E_UPSTREAM_KEY_NOT_SET:-" + UPSTREAM_KEY + "}"
    code, output = check_config(tmp_path, config)
    assert code == 0, output


def test_check_config_never_prints_a_secret(tmp_path: Path) -> None:
    secret = "sk-env-secret-e2e-abcdef0123456789"
    config = valid_config()
    config["providers"]["mock"]["api_key"] = "${E2E_PROVIDER_SECRET}"
    config["providers"]["mock"]["type"] = "not-a-provider-type"
    config["auth"]["keys"].append({"name": "team-a", "key": "short-secret", "models": ["*"]})
    config["models"][0]["deployments"][0]["provider"] = "nope-provider"
    code, output = check_config(
        tmp_path, config, env={"E2E_PROVIDER_SECRET": secret, "GATEWAY_ADMIN_KEY": secret}
    )
    assert code != 0
    assert output.strip()
    assert "short-secret" not in output
    assert secret not in output


def test_check_config_short_key_is_reported_without_its_value(tmp_path: Path) -> None:
    config = valid_config()
    config["auth"]["keys"][0]["key"] = "sk-short-secret"
    code, output = check_config(tmp_path, config)
    assert code != 0
    assert "auth.keys[0].key" in output
    assert "sk-short-secret" not in output


def test_check_config_section_of_the_wrong_type(tmp_path: Path) -> None:
    code, output = check_config(tmp_path, "server: [not, a, mapping]\n")
    assert code != 0
    assert "server" in output
