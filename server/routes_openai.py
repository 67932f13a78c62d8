"""POST /v1/chat/completions and /v1/completions: OpenAI's API, streaming and not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from . import openai_api as oa
from .conversations import TurnRequest, TurnResult
from .errors import RequestError, openai_body
from .prompts import encode_prompt, openai_messages, render_chat, split_tool_calls, tool_call_start
from .retention import namespace
from .sse import DONE, HeldBack, comment, frame, turn_frames
from .state import ServerState, as_request_error
from .validate import conversation_header

router = APIRouter()
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.kv


@router.post("/v1/chat/completions")
async def chat_completions(body: oa.ChatRequest, request: Request):
    st = _state(request)
    st.check_model(body.model)
    tools = body.template_tools
    max_tokens = body.max_completion_tokens or body.max_tokens
    options = body.options(max_tokens, tools, body.chat_template_kwargs)
    messages = openai_messages(body.messages)
    prompt = await asyncio.to_thread(
        render_chat, st.tokenizer, messages, tools, body.chat_template_kwargs, st.context_length, options.max_tokens
    )
    turn = TurnRequest(
        prompt,
        messages,
        options,
        conversation_header(request),
        kind="chat",
        namespace=namespace(body.model_extra),
    )
    job = st.submit_turn(turn)
    rid = oa.new_id("chatcmpl")
    if body.stream:
        return StreamingResponse(
            _chat_stream(st, job, rid, body, tools), media_type="text/event-stream", headers=STREAM_HEADERS
        )
    result: TurnResult = await st.result(job, request)
    text, calls = split_tool_calls(st.tokenizer, result.reply.text, tools)
    return oa.chat_body(rid, body.model, result, text, calls)


def _chat_stream(st: ServerState, job, rid: str, body: oa.ChatRequest, tools) -> AsyncIterator[str]:
    model = body.model
    held = HeldBack(tool_call_start(st.tokenizer, tools))

    def delta(piece: str):
        if out := held.add(piece):
            yield frame(oa.chat_chunk(rid, model, {"content": out}))

    def end(result: TurnResult):
        rest, calls = split_tool_calls(st.tokenizer, result.reply.text, tools)
        if calls:
            tail = rest[held.sent :] if rest.startswith(held.text[: held.sent]) else ""
            if tail:
                yield frame(oa.chat_chunk(rid, model, {"content": tail}))
            yield frame(oa.chat_chunk(rid, model, {"tool_calls": oa.tool_calls(calls, streaming=True)}))
        elif len(result.reply.text) > held.sent:
            yield frame(oa.chat_chunk(rid, model, {"content": result.reply.text[held.sent :]}))
        yield frame(oa.chat_chunk(rid, model, {}, oa.finish_reason(result, calls)))
        if body.include_usage:
            yield frame(oa.chat_chunk(rid, model, {}, usage_=oa.usage(result), choices=False))
        yield DONE

    return turn_frames(
        job,
        st.config.keepalive_seconds,
        ping=comment(),
        start=[frame(oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}))],
        delta=delta,
        error=_error,
        end=end,
    )


def _error(e: BaseException):
    yield frame(openai_body(as_request_error(e)))
    yield DONE


@router.post("/v1/completions")
async def completions(body: oa.CompletionRequest, request: Request):
    st = _state(request)
    st.check_model(body.model)
    if body.echo:
        raise RequestError(400, "echo is not supported", param="echo")
    options = body.options(body.max_tokens)
    prompt = await asyncio.to_thread(encode_prompt, st.tokenizer, body.prompt, st.context_length, options.max_tokens)
    text = body.prompt if isinstance(body.prompt, str) else ""
    turn = TurnRequest(
        prompt,
        [{"role": "prompt", "content": text}],
        options,
        conversation_header(request),
        kind="completion",
        namespace=namespace(body.model_extra),
    )
    job = st.submit_turn(turn)
    rid = oa.new_id("cmpl")
    if body.stream:
        return StreamingResponse(
            _completion_stream(st, job, rid, body), media_type="text/event-stream", headers=STREAM_HEADERS
        )
    return oa.completion_body(rid, body.model, await st.result(job, request))


def _completion_stream(st: ServerState, job, rid: str, body: oa.CompletionRequest) -> AsyncIterator[str]:
    model = body.model

    def end(result: TurnResult):
        yield frame(oa.completion_chunk(rid, model, "", oa.finish_reason(result, [])))
        if body.include_usage:
            yield frame(oa.completion_chunk(rid, model, "", usage_=oa.usage(result), choices=False))
        yield DONE

    return turn_frames(
        job,
        st.config.keepalive_seconds,
        ping=comment(),
        delta=lambda piece: [frame(oa.completion_chunk(rid, model, piece))],
        error=_error,
        end=end,
    )
