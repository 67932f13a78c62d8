"""The ASGI application: routes, error bodies in each API's format, and the server's lifetime."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from . import metrics
from .auth import Guard
from .config import ServerConfig
from .errors import RequestError, body_for
from .prompts import encode_prompt, openai_messages, render_chat
from .request_log import RequestLog
from .state import ServerState, as_request_error

log = logging.getLogger("kvstore.server")
PINNED_OVER_BUDGET = "X-Kvstore-Pinned-Over-Budget"  # response header: pinned prefixes alone exceed --max-disk


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where or 'body'}: {first.get('msg')}{more}", where or None


def create_app(config: ServerConfig, state: ServerState | None = None) -> RequestLog:
    """The server's ASGI app; loads the model and opens the store now (on the model thread)."""
    st = state or ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        st.close()

    app = FastAPI(title="kvstore serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kv = st

    def reply(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(body_for(request.url.path, e), status_code=e.status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return reply(request, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return reply(request, RequestError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return reply(request, RequestError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _any(request: Request, e: Exception):
        return reply(request, as_request_error(e))

    from . import routes_anthropic, routes_openai

    app.include_router(routes_openai.router)
    app.include_router(routes_anthropic.router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": st.model_id, "queued": st.worker.queued()}

    def model_entry(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": int(st.started),
            "owned_by": "kvstore",
            "context_length": st.context_length,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_entry(name) for name in (st.model_id, *st.aliases)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        st.check_model(model_id)
        return model_entry(model_id if model_id in st.aliases else st.model_id)

    @app.get("/v1/cache/stats")
    async def cache_stats(request: Request):
        stats = await st.call(st.conversations.stats, request)
        return dict(stats, model=st.model_id, queued=st.worker.queued())

    @app.post("/v1/cache/lookup")
    async def cache_lookup(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "the request body is not valid JSON") from None
        except RecursionError:  # json's parser recurses once per level (issue 25)
            raise RequestError(400, "the request body is nested too deeply to parse") from None
        if not isinstance(body, dict) or ("messages" in body) == ("prompt" in body):
            raise RequestError(400, "give either messages (a chat) or prompt (a completion)")
        if "messages" in body:
            if not isinstance(body["messages"], list):
                raise RequestError(400, "messages must be a list", param="messages")
            prompt = render_chat(
                st.tokenizer,
                openai_messages(body["messages"]),
                body.get("tools"),
                body.get("chat_template_kwargs"),
                None,
                1,
            )
        else:
            prompt = encode_prompt(st.tokenizer, body["prompt"], None, 1)
        return await st.call(lambda: st.conversations.lookup(prompt), request)

    @app.get("/metrics")
    async def metrics_endpoint():
        metrics.set_queue_depth(st.worker.queued())  # before this scrape queues its own job
        # The store's size is read on the model thread; a scrape during a long turn shows the last size read.
        job = st.submit(lambda job: metrics.set_store_bytes(st.store.stats().bytes_on_disk))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), 1.0)
        except asyncio.TimeoutError:
            pass
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    @app.delete("/v1/cache")
    async def cache_clear(request: Request):
        return await st.call(st.conversations.clear, request)

    return RequestLog(
        Guard(PinsOverBudget(app, st), config.api_key, config.max_body_bytes), stopping=lambda: st.stopping
    )


class PinsOverBudget:
    """ASGI: every response says when pins alone hold the store over --max-disk (the log warns too).

    A plain ASGI wrapper, not an HTTP middleware: those wrap streaming responses and a client's
    disconnect would no longer reach the generation it should stop.
    """

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_marked(message):
            if message["type"] == "http.response.start" and self.state.budget.pinned_over_budget:
                header = (PINNED_OVER_BUDGET.lower().encode(), b"true")
                message = dict(message, headers=[*message.get("headers", []), header])
            await send(message)

        await self.app(scope, receive, send_marked)
