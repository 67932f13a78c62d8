"""POST /v1/messages: Anthropic's Messages API, streaming events included."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from . import anthropic_api as an
from .conversations import TurnRequest, TurnResult
from .errors import anthropic_body
from .prompts import anthropic_messages, anthropic_tools, render_chat, split_tool_calls, tool_call_start
from .retention import anthropic_pins
from .routes_openai import STREAM_HEADERS
from .sse import HeldBack, frame, turn_frames
from .state import ServerState, as_request_error
from .validate import conversation_header

router = APIRouter()


@router.post("/v1/messages")
async def messages(body: an.MessagesRequest, request: Request):
    st: ServerState = request.app.state.kv
    st.check_model(body.model)
    tools = anthropic_tools(body.tools) if body.template_tools else None
    options = body.options(tools)
    msgs = anthropic_messages(body.system, body.messages)
    prompt = await asyncio.to_thread(
        render_chat, st.tokenizer, msgs, tools, None, st.context_length, options.max_tokens
    )
    pins = await asyncio.to_thread(anthropic_pins, st.tokenizer, prompt, body.system, body.messages, body.tools)
    turn = TurnRequest(
        prompt,
        msgs,
        options,
        conversation_header(request),
        kind="messages",
        pins=pins,
        first_index=-1 if msgs[0]["role"] == "system" else 0,
    )
    job = st.submit_turn(turn)
    mid = an.new_id()
    if body.stream:
        return StreamingResponse(
            _stream(st, job, mid, body.model, len(prompt), tools),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
        )
    result: TurnResult = await st.result(job, request)
    text, calls = split_tool_calls(st.tokenizer, result.reply.text, tools)
    return an.message_body(mid, body.model, result, text, calls)


def _stream(st: ServerState, job, mid: str, model: str, prompt_tokens: int, tools) -> AsyncIterator[str]:
    held = HeldBack(tool_call_start(st.tokenizer, tools))
    opened = False  # the text block has started

    def text_frames(text: str):
        nonlocal opened
        if not opened:
            yield frame(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            )
            opened = True
        if text:
            yield frame(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                "content_block_delta",
            )

    def delta(piece: str):
        if out := held.add(piece):
            yield from text_frames(out)

    def end(result: TurnResult):
        rest, calls = split_tool_calls(st.tokenizer, result.reply.text, tools)
        final = rest if calls else result.reply.text
        if len(final) > held.sent or not (opened or calls):
            yield from text_frames(final[held.sent :])
        index = 0
        if opened:
            yield frame({"type": "content_block_stop", "index": 0}, "content_block_stop")
            index = 1
        for block in an.tool_use_blocks(calls):
            yield frame(
                {"type": "content_block_start", "index": index, "content_block": dict(block, input={})},
                "content_block_start",
            )
            yield frame(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                },
                "content_block_delta",
            )
            yield frame({"type": "content_block_stop", "index": index}, "content_block_stop")
            index += 1
        reason, seq = an.stop_reason(result, calls)
        usage = an.usage(result)
        yield frame(
            {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage},
            "message_delta",
        )
        yield frame({"type": "message_stop"}, "message_stop")

    return turn_frames(
        job,
        st.config.keepalive_seconds,
        ping=frame({"type": "ping"}, "ping"),
        start=[frame(an.message_start(mid, model, prompt_tokens), "message_start")],
        delta=delta,
        error=lambda e: [frame(anthropic_body(as_request_error(e)), "error")],
        end=end,
    )
