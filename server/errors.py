"""Errors a request can meet, and their bodies in each API's own format (never a traceback)."""

from __future__ import annotations

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# HTTP status -> OpenAI's error type
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class RequestError(Exception):
    """A request the server refuses: an HTTP status, a message, and (OpenAI) the parameter and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def openai_body(e: RequestError) -> dict:
    return {
        "error": {
            "message": e.message,
            "type": _OPENAI_TYPES.get(e.status, "invalid_request_error"),
            "param": e.param,
            "code": e.code,
        }
    }


def anthropic_body(e: RequestError) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(e.status, "api_error"), "message": e.message}}


def body_for(path: str, e: RequestError) -> dict:
    """The error body in the format of the API `path` belongs to."""
    return anthropic_body(e) if path.startswith("/v1/messages") else openai_body(e)
