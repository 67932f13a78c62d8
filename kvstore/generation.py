"""Generate with mlx-lm and keep the cache: (text, cache, the exact token ids it has seen), ready for `store.save`.

    text, cache, seen = kvstore.generate(model, tokenizer, "Summarize: ...", max_tokens=64)
    store.save("notes", cache, seen, model=fp)
    cache, seen = store.load("notes", model=fp)
    more = seen + tokenizer.encode(" And the risks?", add_special_tokens=False)
    text, cache, seen = kvstore.generate(model, tokenizer, more, cache=cache, cache_tokens=seen)

mlx-lm's `generate(prompt_cache=...)` expects only the tokens the cache has not seen: given the whole
prompt again it prefills the prefix a second time, silently. Here the prompt is always the whole
sequence; with a cache, its tokens must extend the cache's (else `TokenMismatchError`) and only
the rest is prefilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from kvstore.cache.leaves import cache_nbytes, cache_tokens
from kvstore.errors import StoreError, TokenMismatchError

__all__ = ["generate", "Generation", "cache_tokens", "cache_nbytes", "check_cache"]


class Generation(NamedTuple):
    """What `generate` returns: unpack as `text, cache, tokens = kvstore.generate(...)`."""

    text: str
    cache: list  # the mlx-lm cache, having seen exactly `tokens`
    tokens: list[int]  # prompt + generated token ids the cache holds, in order (for store.save)


_tokens_seen = cache_tokens  # generate() has a parameter of that name


def check_cache(cache: Sequence, tokens: Sequence[int] | None = None) -> int:
    """Check that a cache is one kvstore can store, its layers agree, and (given) it has seen len(tokens).

    Returns its token count. Raises UnsupportedCacheError for a class the store does not know,
    TokenMismatchError when `tokens` is not as long as what the cache has seen.
    """
    n = cache_tokens(cache)
    if tokens is not None and len(tokens) != n:
        raise TokenMismatchError(f"the cache has seen {n} tokens, but {len(tokens)} token ids were given")
    return n


def _encode(tokenizer: Any, prompt: str | Sequence[int], continuing: bool) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    # As mlx-lm does for a fresh prompt; text that continues a cache gets no second BOS.
    special = not continuing and (bos is None or not prompt.startswith(bos))
    return list(tokenizer.encode(prompt, add_special_tokens=special))


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    cache: list | None = None,
    cache_tokens: Sequence[int] | None = None,
    max_tokens: int = 256,
    **kwargs,
) -> Generation:
    """Run mlx-lm's generation and return (text, cache, token ids the cache has seen).

    Args:
        model, tokenizer: from `mlx_lm.load` (or `kvstore.models.builtin.load_builtin`).
        prompt: the whole prompt: token ids, or text (encoded as mlx-lm does; with a cache, the text
            is taken as new tokens that follow `cache_tokens`).
        cache: a cache to continue (e.g. from `store.load` / `store.restore`), or None for a fresh one.
        cache_tokens: the token ids `cache` has seen; required with a non-empty cache. Token-id
            prompts must start with them (TokenMismatchError otherwise): only the rest is prefilled.
        max_tokens: at most this many generated tokens.
        kwargs: passed to `mlx_lm.stream_generate` (sampler=, logits_processors=, prefill_step_size=, ...).

    The returned cache is `cache` itself (updated in place) or a new one.
    """
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    if "prompt_cache" in kwargs:
        raise TypeError("pass the cache as cache= (with cache_tokens=), not prompt_cache=")
    if cache is None:
        if cache_tokens:
            raise TypeError("cache_tokens= was given without a cache")
        cache, seen = make_prompt_cache(model), []
    else:
        n = check_cache(cache) if cache else 0
        if n and cache_tokens is None:
            raise TokenMismatchError(
                f"the cache has seen {n} tokens: pass them as cache_tokens= so the prompt "
                "can be checked against them (mlx-lm would prefill them twice)"
            )
        seen = [int(t) for t in (cache_tokens or [])]
        if len(seen) != n:
            raise TokenMismatchError(f"the cache has seen {n} tokens, but cache_tokens has {len(seen)}")
    if isinstance(prompt, str) and seen:
        full = seen + _encode(tokenizer, prompt, continuing=True)
    else:
        full = _encode(tokenizer, prompt, continuing=False)
        if full[: len(seen)] != seen:
            at = next((i for i, (a, b) in enumerate(zip(full, seen)) if a != b), min(len(full), len(seen)))
            raise TokenMismatchError(
                f"the prompt does not extend the cache's {len(seen)} tokens (they differ from position {at}): "
                "pass the whole prompt, starting with the tokens the cache has seen"
            )
    if not full:
        raise ValueError("the prompt is empty")
    rest = full[len(seen) :]
    if not rest:
        # Nothing new: the model needs one token to produce the next one's logits. Step back one.
        if not can_trim_prompt_cache(cache):
            raise ValueError("the prompt adds no token to the cache, and this cache cannot be trimmed by one")
        trim_prompt_cache(cache, 1)
        rest = full[-1:]
    generated: list[int] = []
    text = []
    for response in stream_generate(model, tokenizer, rest, max_tokens=max_tokens, prompt_cache=cache, **kwargs):
        text.append(response.text)
        generated.append(int(response.token))
    everything = full + generated
    n = _tokens_seen(cache)
    if n > len(everything):
        raise StoreError(f"the cache has seen {n} tokens, more than the {len(everything)} prompt and generated ones")
    return Generation("".join(text), cache, everything[:n])
