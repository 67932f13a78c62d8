"""The mechanics of one chat turn: render the prompt, prefill in chunk-aligned steps, generate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from kvstore.cache import codec
from kvstore.cache.capture import Capture

from .records import GenerationOptions, Reply

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


def cache_offset(cache: list) -> int:
    """Tokens the cache has processed (from its first positional layer)."""
    _tree, _slots, leaves = codec.describe(list(cache))
    for leaf in leaves:
        off = codec.leaf_offset(leaf)
        if off is not None:
            return off
    raise ValueError("this model's cache has no positional layer: its length is unknown")


def cache_nbytes(cache: list) -> int:
    """Bytes held by a cache's arrays (allocated, including growth padding)."""
    _tree, _slots, leaves = codec.describe(list(cache))
    total = 0
    for leaf in leaves:
        try:
            total += int(leaf.nbytes)
        except (AttributeError, TypeError):
            total += sum(a.nbytes for a in leaf.state if isinstance(a, mx.array))
    return total


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
    trim_prompt_cache(cache, have - keep)
    return cache_offset(cache) == keep


def copy_cache(cache: list) -> list:
    """A deep copy with new arrays: appending to one never shows in the other."""
    from kvstore.cache import codec as c

    tree, _slots, leaves = c.describe(list(cache))
    fresh = []
    for leaf in leaves:
        new = type(leaf).__new__(type(leaf))
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
    mx.eval([a for leaf in fresh for a in _arrays(leaf)])
    return c.build(tree, fresh)


def _arrays(leaf) -> list:
    out = []
    for attr in ("keys", "values"):
        v = getattr(leaf, attr, None)
        out.extend(v if isinstance(v, tuple) else [v] if isinstance(v, mx.array) else [])
    out.extend(a for a in getattr(leaf, "cache", None) or [] if isinstance(a, mx.array))
    return out


def prefill(
    model: Any,
    cache: list,
    tokens: list[int],
    start: int,
    end: int,
    step: int,
    capture: Capture | None,
    progress: Progress = None,
) -> None:
    """Run tokens[start:end] through the model into `cache`, with step boundaries at multiples of `step`.

    `step` is a multiple of the store's chunk size, so after every step each sliding-window layer
    still holds the chunks that step completed, and `capture` copies them before they rotate out.
    """
    pos = start
    while pos < end:
        stop = min(end, (pos // step + 1) * step)
        model(mx.array(tokens[pos:stop])[None], cache=cache)
        mx.eval([c.state for c in cache])
        if capture is not None:
            capture.take(cache)
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


class StopScan:
    """Holds back text that could be the start of a stop string, and cuts the text at the first one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.hit: str | None = None  # the stop string that ended the text

    def feed(self, segment: str) -> str:
        """The text that is safe to hand out after `segment` arrived."""
        if not self.stops:
            return segment
        self.pending += segment
        found = [(i, s) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if found:
            cut, self.hit = min(found)
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    model: Any,
    tokenizer: Any,
    cache: list,
    last: list[int],
    state: TurnState,
    capture: Capture | None = None,
    fed: int = 0,
) -> Iterator[str]:
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
    )
    try:
        for token, _logprobs in steps:
            token = int(token)
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
