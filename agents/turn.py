"""The mechanics of one chat turn: render the prompt, prefill in chunk-aligned steps, generate."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from kvstore.cache import codec
from kvstore.cache.capture import Capture
from kvstore.cache.leaves import arrays_of, cache_tokens

from .records import GenerationOptions, Reply
from .stops import StopScan

Progress = Callable[[int, int], None] | None


@dataclass
class TurnState:
    """One turn in flight: its prompt, where the prompt's tokens came from, and what was generated.

    The agent manager fills it as the turn goes; `reply` is set once the turn is finished (also
    when the caller stopped it early).
    """

    prompt: list[int]
    messages: list[dict]  # the conversation after this turn's prompt (system prompt apart)
    options: GenerationOptions
    t0: float = field(default_factory=time.perf_counter)
    reused: int = 0  # prompt tokens from a resident cache
    restored: int = 0  # prompt tokens from the store
    restore_seconds: float = 0.0
    prefill_seconds: float = 0.0
    errors: list = field(default_factory=list)  # damaged blobs recomputed this turn
    tokens: list[int] = field(default_factory=list)  # generated ids (an end-of-turn token included)
    text: str = ""
    first: float | None = None  # perf_counter at the first generated token
    finish: str = "length"  # "stop" | "length" | "interrupted"
    stopped_by: str | None = None  # the stop string that ended the reply
    reply: Reply | None = None


def render(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None
) -> list[int]:
    """Prompt token ids: the tokenizer's chat template over `messages`, ready for the assistant's turn.

    `tools` and `template_kwargs` go to the template (as transformers' apply_chat_template takes them).
    """
    if getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "_chat_template", None):
        extra = dict(template_kwargs or {})
        if tools:
            extra["tools"] = tools
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(out, dict):  # transformers 5 may hand back a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]
    # A base model without a template: a plain transcript, so turns still share their prefix.
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
    return [int(t) for t in tokenizer.encode(text)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))[0]
    return int(diff[0]) if diff.size else n


def continue_exactly(eos_ids: Collection[int], own: list[int], prompt: list[int]) -> list[int]:
    """The prompt of a turn that continues `own` (what the cache has seen) token for token.

    A re-rendered history need not re-tokenize the model's replies to the ids it generated (BPE
    merges across what were separate steps; the streamed text drops a leading space or a broken
    UTF-8 byte), and a recurrent state cannot be cut back to where they part: the whole history
    would be prefilled again. The turn's prompt is therefore `own` followed by what `prompt` holds
    after the end-of-turn token that closes own's last reply: generation stops at the first
    end-of-turn token, so own's k-th one (or the k+1-th, when its last reply was cut short) is
    prompt's k-th. The caller checks that the conversation's messages are the ones the agent
    recorded (no reply was edited); `prompt` is returned as it is when it already continues `own`
    or has no such token.
    """
    keep = common_prefix(own, prompt)
    if keep == len(own) or not own:
        return prompt
    eos = np.fromiter(eos_ids, dtype=np.int64)
    closed = own[-1] in set(eos.tolist())
    k = int(np.isin(np.asarray(own), eos).sum()) - (1 if closed else 0)
    ends = np.nonzero(np.isin(np.asarray(prompt), eos))[0]
    if k >= ends.size or int(ends[k]) < keep:
        return prompt
    end = int(ends[k])
    return own + prompt[end + 1 :] if closed else own + prompt[end:]


def min_window(cache: list) -> int | None:
    """The smallest sliding window among a cache's layers (None when every layer holds everything)."""
    _tree, slots, _leaves = codec.describe(list(cache))
    sizes = [s.param("max_size") for s in slots if s.cls == "RotatingKVCache"]
    return min(sizes) if sizes else None


def trim_to(cache: list, have: int, keep: int) -> bool:
    """Trim a cache that has seen `have` tokens down to its first `keep`; False where it cannot be trimmed."""
    if keep == have:
        return True
    if keep > have or not can_trim_prompt_cache(cache):
        return False  # e.g. a sliding-window layer that has already rotated past its window
    if not _chunked_attention_kept(cache, keep):
        return False
    trim_prompt_cache(cache, have - keep)
    return cache_tokens(cache) == keep


def _chunked_attention_kept(cache: list, keep: int) -> bool:
    """Whether every ChunkedKVCache (llama4) layer, cut back to `keep`, still holds the start of the
    attention chunk position keep - 1 lies in. mlx-lm calls such a layer trimmable whatever it
    dropped: cut back into an earlier chunk, it would attend without that chunk's start
    (tests/test_families.py, the llama4 prompt that diverges in an earlier chunk)."""
    _tree, slots, leaves = codec.describe(list(cache))
    return all(
        leaf.start_position <= codec.window_start(slot, keep)
        for slot, leaf in zip(slots, leaves)
        if slot.cls == "ChunkedKVCache"
    )


def copy_cache(cache: list) -> list:
    """A deep copy with new arrays: appending to one never shows in the other."""
    from kvstore.cache import codec as c

    tree, _slots, leaves = c.describe(list(cache))
    fresh = []
    for leaf in leaves:
        new = type(leaf).__new__(type(leaf))  # type: ignore[call-overload]  # a cache class, not a metaclass
        new.__dict__.update(leaf.__dict__)
        for attr in ("keys", "values"):
            v = getattr(leaf, attr, None)
            if isinstance(v, tuple):
                setattr(new, attr, tuple(mx.array(a) for a in v))
            elif isinstance(v, mx.array):
                setattr(new, attr, mx.array(v))
        if isinstance(getattr(leaf, "cache", None), list):
            new.cache = [None if a is None else mx.array(a) for a in leaf.cache]
        fresh.append(new)
    mx.eval(arrays_of(fresh))
    return c.build(tree, fresh)


def prefill(
    model: Any,
    cache: list,
    tokens: list[int],
    start: int,
    end: int,
    step: int,
    capture: Capture | None,
    progress: Progress = None,
    *,
    kv: Any = None,
) -> None:
    """Run tokens[start:end] through the model into `cache`, with step boundaries at multiples of `step`.

    `step` is a multiple of the store's chunk size, so after every step each sliding-window layer
    still holds the chunks that step completed, and `capture` copies them before they rotate out.
    A model with recurrent state also stops at the capture's checkpoint boundaries and copies its
    state there (the only positions a later prefix restore can land on).
    `kv` (agents.kv.KVQuantization) quantizes the cache before a step as mlx-lm's generate does.
    """
    marks = capture.boundaries(tokens, start, end) if capture is not None else []
    pos = start
    while pos < end:
        stop = min(end, (pos // step + 1) * step, next((b for b in marks if b > pos), end))
        if kv is not None:
            kv.apply(cache)
        model(mx.array(tokens[pos:stop])[None], cache=cache)
        mx.eval([c.state for c in cache])
        if capture is not None:
            capture.take(cache)
            if marks and stop in marks:
                capture.checkpoint(cache, stop)
        pos = stop
        if progress is not None:
            progress(pos - start, end - start)
    mx.clear_cache()


def cold_ttft(model: Any, cache: list, prompt: list[int], step: int) -> float:
    """Seconds to the first token of `prompt` from the empty `cache`, nothing stored: what a turn costs
    without kvstore (the demo and bench_real_model compare their turns with it)."""
    t0 = time.perf_counter()
    prefill(model, cache, prompt, 0, len(prompt) - 1, step, None)
    steps = generate_step(mx.array(prompt[-1:]), model, prompt_cache=cache, max_tokens=1)
    next(steps)
    elapsed = time.perf_counter() - t0
    steps.close()
    return elapsed


def sampling(options: GenerationOptions) -> tuple[Callable, list]:
    """(sampler, logits processors) for mlx-lm's generate_step; seeds MLX's generator when asked."""
    if options.seed is not None:
        mx.random.seed(options.seed)
    sampler = make_sampler(options.temp, top_p=options.top_p, min_p=options.min_p, top_k=options.top_k)
    return sampler, make_logits_processors(repetition_penalty=options.repetition_penalty)


def generate(
    model: Any,
    tokenizer: Any,
    cache: list,
    last: list[int],
    state: TurnState,
    capture: Capture | None = None,
    fed: int = 0,
    *,
    kv: Any = None,
) -> Generator[str, None, None]:
    """Generate from the prompt's last token; yields text segments and fills `state`.

    `state.tokens` gets the generated ids (an end-of-turn token included: the cache has seen it
    too), `state.first` the time of the first token, `state.finish` "stop" or "length", `state.text`
    the reply (cut before a stop string). mlx-lm's generate_step feeds each token into the cache
    before yielding it, so when this stops, the cache has seen exactly prompt + state.tokens. `fed`
    is how many tokens the cache held before `last`; with a `capture`, every chunk the answer
    completes is taken while it is still inside the sliding window.
    """
    opts = state.options
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    scan = StopScan(opts.stop)
    sampler, processors = sampling(opts)
    state.tokens, state.first, state.finish, state.text = [], None, "length", ""
    steps = generate_step(
        mx.array(last),
        model,
        prompt_cache=cache,
        max_tokens=opts.max_tokens,
        sampler=sampler,
        logits_processors=processors,
        **(kv.generate_kwargs() if kv is not None else {}),
    )
    try:
        for step, _logprobs in steps:
            token = int(step)
            if state.first is None:
                state.first = time.perf_counter()
            state.tokens.append(token)
            if capture is not None and (fed + len(last) + len(state.tokens)) % capture.chunk_size == 0:
                capture.take(cache)
            if token in eos:
                state.finish = "stop"
                break
            detok.add_token(token)
            segment = scan.feed(detok.last_segment)  # reading last_segment consumes it
            if segment:
                state.text += segment
                yield segment
            if scan.hit:
                state.finish, state.stopped_by = "stop", scan.hit
                break
            if len(state.tokens) >= opts.max_tokens:
                break
    finally:
        steps.close()
        if not scan.hit:
            detok.finalize()
            tail = scan.feed(detok.last_segment)
            tail += "" if scan.hit else scan.flush()
            state.text += tail
            if scan.hit:
                state.finish, state.stopped_by = "stop", scan.hit
        else:
            tail = ""
    if tail:
        yield tail
