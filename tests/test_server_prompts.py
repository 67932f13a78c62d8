"""The server's request translation: messages and tools into the chat template, tool calls out of replies."""

from __future__ import annotations

import json
import shutil

import pytest

from kvstore.server.errors import RequestError
from kvstore.server.prompts import (
    anthropic_messages,
    anthropic_tools,
    encode_prompt,
    openai_messages,
    render_chat,
    split_tool_calls,
    tool_call_start,
)
from kvstore.server.sse import held_back

# A Qwen-style template: tools in the system turn, calls as <tool_call>{json}</tool_call>, results as tool turns.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content or '' }}"
    "{%- for tool_call in message.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{%- endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory):
    """The built-in model's tokenizer with a tool-calling template: mlx-lm infers its tool parser."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from kvstore.models.builtin import builtin_model_path

    src = builtin_model_path(arch="llama", size="tiny", root=tmp_path_factory.mktemp("models"))
    dest = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(src, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(dest)
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    return tok


def test_tool_calls_are_parsed_out_of_a_reply(tool_tokenizer):
    reply = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text, calls = split_tool_calls(tool_tokenizer, reply, WEATHER)
    assert text == "Let me check."
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")
    assert split_tool_calls(tool_tokenizer, reply, None) == (reply, [])  # no tools asked for: plain text
    cut = 'Hmm <tool_call>{"name": "get_wea'  # cut short by max_tokens: left as text
    assert split_tool_calls(tool_tokenizer, cut, WEATHER) == (cut, [])
    assert tool_call_start(tool_tokenizer, WEATHER) == "<tool_call>"


def test_tools_and_tool_turns_reach_the_template(tool_tokenizer):
    messages = openai_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ]
    )
    assert messages[0]["role"] == "system" and messages[1]["content"] == "Weather in Paris?"
    text = tool_tokenizer.decode(render_chat(tool_tokenizer, messages, WEATHER, None, None, 16))
    assert text.startswith("<|im_start|>system\nTools: get_weather<|im_end|>")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n18 C and sunny<|im_end|>" in text


def test_anthropic_blocks_become_the_same_template_messages(tool_tokenizer):
    converted = anthropic_messages(
        [{"type": "text", "text": "Be brief."}],
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "18 C and sunny"}],
                    }
                ],
            },
        ],
    )
    assert [m["role"] for m in converted] == ["system", "user", "assistant", "tool"]
    assert converted[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert converted[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C and sunny"}
    tools = anthropic_tools(
        [
            {
                "name": "get_weather",
                "description": "Weather in a city",
                "input_schema": WEATHER[0]["function"]["parameters"],
            }
        ]
    )
    assert tools == WEATHER


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": 5}],
    ],
)
def test_bad_openai_messages_are_request_errors(bad):
    with pytest.raises(RequestError) as e:
        openai_messages(bad)
    assert e.value.status == 400


def test_prompt_length_and_token_ids_are_checked(tool_tokenizer):
    with pytest.raises(RequestError) as e:
        encode_prompt(tool_tokenizer, "word " * 50, 10, 1)
    assert e.value.code == "context_length_exceeded"
    assert encode_prompt(tool_tokenizer, [5, 6, 7], None, 1) == [5, 6, 7]
    with pytest.raises(RequestError):
        encode_prompt(tool_tokenizer, [5, 10**9], None, 1)
    with pytest.raises(RequestError):
        encode_prompt(tool_tokenizer, {"not": "a prompt"}, None, 1)


def test_streamed_text_holds_back_a_tool_call_marker():
    assert held_back("plain text", None) == len("plain text")
    assert held_back("I will call <tool", "<tool_call>") == len("I will call ")
    assert held_back("I will call <tool_call>{", "<tool_call>") == len("I will call ")
    assert held_back("no marker here", "<tool_call>") == len("no marker here")
