"""An ASGI guard in front of the routes: the API key, and the request body's size."""

from __future__ import annotations

import hmac
import json

from .errors import RequestError, body_for

OPEN_PATHS = ("/health",)  # liveness checks need no key


def _key_of(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key else None


class Guard:
    """Refuses requests without the API key (401) and bodies over `max_body` bytes (413), in the API's format."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def _refuse(self, send, path: str, e: RequestError) -> None:
        body = json.dumps(body_for(path, e)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.api_key and path not in OPEN_PATHS:
            given = _key_of(headers)
            if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._refuse(
                    send,
                    path,
                    RequestError(
                        401,
                        "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                        code="invalid_api_key",
                    ),
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(
                send, path, RequestError(413, f"the request body is {int(length)} bytes; the limit is {self.max_body}")
            )
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            # curl -d and some clients send no JSON content type; the body is JSON all the same.
            scope = dict(
                scope,
                headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                + [(b"content-type", b"application/json")],
            )
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge()
            return message

        try:
            return await self.app(scope, limited, send)
        except BodyTooLarge:
            return await self._refuse(send, path, RequestError(413, f"the request body is over {self.max_body} bytes"))


class BodyTooLarge(Exception):
    """A chunked body grew past the limit."""
