"""OpenAI-compatible LLM gateway."""

from gateway.app import Gateway, build_app
from gateway.config import Config, ConfigError, load, parse
from gateway.errors import GatewayError

__all__ = ["Config", "ConfigError", "Gateway", "GatewayError", "build_app", "load", "parse"]
