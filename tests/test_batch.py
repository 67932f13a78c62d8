"""Batched decoding (server/batch.py): each row decodes as it would alone, and leaves with its own cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import kvstore
from kvstore.agents import GenerationOptions, resolve_model, turn
from kvstore.server.batch import DecodeBatch, Row, batchable


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    from kvstore.models.builtin import builtin_model_path

    return resolve_model(str(builtin_model_path(root=tmp_path_factory.mktemp("models"))))


def prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    shared = rng.integers(1, 200, 40).tolist()  # a preamble every prompt shares, as agents of one team do
    return [shared + rng.integers(1, 200, int(rng.integers(3, 30))).tolist() for _ in range(n)]


def prefilled(handle, prompt: list[int]) -> list:
    cache = handle.make_cache()
    turn.prefill(handle.model, cache, prompt, 0, len(prompt) - 1, 512, None)
    return cache


def alone(handle, prompt: list[int], options: GenerationOptions, n: int) -> list[int]:
    """What generate_step (a turn run alone) samples after `prompt`, as agents/turn.py sets it up."""
    sampler, processors = turn.sampling(options)
    steps = generate_step(
        mx.array(prompt[-1:]),
        handle.model,
        prompt_cache=prefilled(handle, prompt),
        max_tokens=n,
        sampler=sampler,
        logits_processors=processors,
    )
    return [int(t) for t, _ in steps]


def test_the_builtin_model_batches_and_a_sliding_window_one_does_not(handle, tmp_path):
    from kvstore.models.builtin import builtin_model_path

    assert batchable(handle.make_cache())
    gemma = resolve_model(str(builtin_model_path(arch="gemma3", root=tmp_path)))
    assert not batchable(gemma.make_cache())


def test_greedy_rows_joining_and_leaving_between_steps_decode_as_alone(handle):
    """Rows join at different steps and leave at different lengths; every row's tokens are its tokens alone."""
    ps = prompts(6)
    greedy = GenerationOptions(max_tokens=64)
    want = [alone(handle, p, greedy, 24) for p in ps]
    batch = DecodeBatch(handle.model)
    got: dict[int, list[int]] = {}
    order: list[int] = []  # the prompt index of each row
    left = 0
    for step in range(60):
        if step % 3 == 0 and step // 3 < len(ps):  # a new request joins every third step
            i = step // 3
            batch.join(Row.for_options(greedy, ps[i][-1]), prefilled(handle, ps[i]))
            order.append(i)
            got[i] = []
        if not len(batch):
            break
        for i, token in zip(order, batch.step()):
            got[i].append(token)
        for row in reversed(range(len(order))):
            i = order[row]
            if len(got[i]) == 24 - 2 * i:  # rows leave at different lengths
                cache = batch.leave(row)
                order.pop(row)
                left += 1
                # The cache holds exactly the prompt and the tokens fed: all sampled but the last.
                assert kvstore.cache_tokens(cache) == len(ps[i]) - 1 + len(got[i])
    assert left == len(ps)
    for i in range(len(ps)):
        assert got[i] == want[i][: len(got[i])]


def test_a_row_leaves_with_the_cache_a_cold_prefill_of_its_tokens_makes(handle):
    """The cache handed back continues exactly: equal KV to a cold prefill, and the same next tokens."""
    ps = prompts(3)
    greedy = GenerationOptions(max_tokens=64)
    batch = DecodeBatch(handle.model)
    for p in ps:
        batch.join(Row.for_options(greedy, p[-1]), prefilled(handle, p))
    fed = [list(p) for p in ps]
    for _ in range(9):
        for f, token in zip(fed, batch.step()):
            f.append(token)
    pending = fed[1].pop()  # sampled, not yet fed
    cache = batch.leave(1)
    cold = prefilled(handle, fed[1] + [pending])
    for mine, ref in zip(cache, cold):
        assert mine.offset == ref.offset == len(fed[1])
        k, rk = mine.state[0], ref.state[0]
        assert np.allclose(np.array(k), np.array(rk[..., : ref.offset, :]), atol=1e-5)
    greedy_more = [
        int(t) for t, _ in generate_step(mx.array([pending]), handle.model, prompt_cache=cache, max_tokens=8)
    ]
    assert greedy_more == alone(handle, fed[1] + [pending], greedy, 8)


def test_sampled_seeded_and_penalized_rows_sample_as_alone(handle):
    """Per-request settings inside one batch: a seeded top-p row, a repetition-penalized greedy row, a greedy row."""
    ps = prompts(3)
    settings = [
        GenerationOptions(temp=0.9, top_p=0.9, seed=7),
        GenerationOptions(repetition_penalty=1.3),
        GenerationOptions(),
    ]
    want = [alone(handle, p, o, 16) for p, o in zip(ps, settings)]
    mx.random.seed(123)  # the batch's unseeded draws use the global generator: a seeded row must not
    batch = DecodeBatch(handle.model)
    for p, o in zip(ps, settings):
        batch.join(Row.for_options(o, p[-1]), prefilled(handle, p))
    got = [[] for _ in ps]
    for _ in range(16):
        for g, token in zip(got, batch.step()):
            g.append(token)
    assert got == want
