"""Every error a client can see, as OpenAI's wire shape.

    GatewayError                      -> {"error": {message, type, param, code}}
    ├── InvalidRequest        400  invalid_request_error
    │   ├── UnsupportedOperation  400  (provider lacks the capability)
    │   ├── BodyTooLarge      413
    │   ├── URITooLong        414  (request line over server.max_header_line_bytes)
    │   ├── UnsupportedMediaType 415  (a body that is not declared as JSON)
    │   └── HeadTooLarge      431  (a header line or the whole head over its bound)
    ├── AuthenticationError   401  (missing, malformed or unknown credential)
    ├── PermissionDenied      403  (model not allowed for this key)
    ├── NotFound              404  (unknown model or route)
    ├── MethodNotAllowed      405
    ├── RateLimited           429  (later: limits)
    ├── ServerError           500  (a bug: logged, never shown)
    ├── UpstreamError         502  (connection reset, bad upstream reply)
    │   ├── UpstreamConnectError 502  (refused/unreachable: nothing was sent)
    │   └── UpstreamTimeout   504
    └── ServiceUnavailable    503  (store unreachable, provider disabled)

Handlers raise these; `RequestContext.send_error` answers with one, so every
layer (middleware, forward, Starlette routes) answers alike.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from gateway.types import Headers


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class UnsupportedOperation(InvalidRequest):
    code = "unsupported_operation"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class URITooLong(InvalidRequest):
    status = 414
    code = "uri_too_long"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class HeadTooLarge(InvalidRequest):
    status = 431
    code = "request_header_fields_too_large"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    """A spend budget is used up (OpenAI's own shape for an exhausted quota)."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class ServerError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamConnectError(UpstreamError):
    """Nothing of the request reached the upstream: always safe to retry elsewhere."""


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_response(exc: GatewayError) -> Response:
    """`exc` as a Starlette response, for the routes Starlette serves."""
    return Response(exc.body(), status_code=exc.status, media_type="application/json")
