"""A provider key revoked upstream, through a real gateway process and the openai SDK: retired, loudly."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import UPSTREAM_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e

REVOKED = "sk-upstream-revoked-9999"


def test_a_revoked_key_is_retired_and_never_sent_again(gateway_factory: Any, mock_upstream: MockOpenAI) -> None:
    config = default_config(mock_upstream)
    config["providers"]["mock"] = {
        "type": "openai",
        "base_url": mock_upstream.base_url,
        "api_keys": ["${REVOKED_KEY}", UPSTREAM_KEY],  # the mock accepts only UPSTREAM_KEY
    }
    gw: GatewayProcess = gateway_factory(config, env={"REVOKED_KEY": REVOKED})
    client = gw.client(max_retries=0)

    for i in range(3):
        answer = client.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": f"hi {i}"}])
        assert answer.choices[0].message.content == f"echo: hi {i}"

    sent = [r.header("authorization") for r in mock_upstream.requests_to("/v1/chat/completions")]
    assert sent == [f"Bearer {REVOKED}", *[f"Bearer {UPSTREAM_KEY}"] * 3]
    log = gw.log_text()
    line = next(line for line in log.splitlines() if "refused API key" in line)
    assert " ERROR gateway.providers: provider mock refused API key providers.mock.api_keys[0] (…9999)" in line
    assert log.count("refused API key") == 1
    assert REVOKED not in log and UPSTREAM_KEY not in log
    with gw.http() as http:
        metrics = http.get("/metrics").text
    assert 'gateway_provider_keys{provider="mock",state="retired"} 1.0' in metrics

    # The last key revoked too: a clear 503 naming the provider, never a key.
    mock_upstream.api_keys = set()
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": "x"}])
    finally:
        mock_upstream.api_keys = {UPSTREAM_KEY}
    assert err.value.status_code == 503
    body: Any = err.value.body
    assert body["code"] == "provider_keys_exhausted" and "provider 'mock'" in body["message"]
    assert UPSTREAM_KEY not in str(body) and REVOKED not in str(body)
