"""The 503 when no deployment could be tried: breakers open, or providers out of keys."""

from __future__ import annotations

from gateway.providers import Target, build_adapter
from gateway.providers.openai import OpenAIConfig
from gateway.routing.forward import unavailable
from gateway.routing.router import Route
from gateway.upstream import UpstreamPool

KEYS = ["sk-unit-key-one-0001", "sk-unit-key-two-0002"]


def route(name: str, *, retired: bool = False) -> Route:
    adapter = build_adapter(name, OpenAIConfig(api_keys=KEYS), "/v1")
    if retired:
        for key in adapter.keys.keys:
            adapter.keys.retire(key)
    return Route(adapter, UpstreamPool("http://127.0.0.1:9/v1"), Target("m"))


def test_open_breakers_only() -> None:
    error = unavailable("main", [route("a"), route("b")])
    assert (error.status, error.code) == (503, "deployments_unavailable")
    assert error.message == "Every deployment of model `main` is unavailable (circuit open); try again shortly."


def test_every_provider_out_of_keys() -> None:
    error = unavailable("main", [route("a", retired=True)])
    assert (error.status, error.code) == (503, "provider_keys_exhausted")
    assert error.message == (
        "Every deployment of model `main` is unavailable: provider 'a' has no usable API key left "
        "(the upstream refused every one)."
    )


def test_some_out_of_keys_and_the_others_open() -> None:
    error = unavailable("main", [route("b", retired=True), route("a", retired=True), route("c")])
    assert error.message == (
        "Every deployment of model `main` is unavailable: providers 'a', 'b' have no usable API key left "
        "(the upstream refused every one), and the others' circuits are open."
    )
    assert not any(key in error.message for key in KEYS)
