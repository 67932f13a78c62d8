"""The restore planner on its own: typed rows in, a typed plan out, no store, no SQL (kvstore.ops.plan)."""

import subprocess
import sys

import numpy as np
import xxhash

from kvstore.cache.codec import Slot
from kvstore.index.rows import TailRow
from kvstore.ops.plan import Chain, Plan, agreeing, extend_by_tail, longest, plan, tail_parents, verified_tails

KV = Slot("KVCache", "kv")
ROT = Slot("RotatingKVCache", "rot", (("keep", 0), ("max_size", 6)))
STATE = Slot("ArraysCache", "state")
KEYS = [bytes([i]) * 16 for i in range(4)]
SPANS = [(0, 4), (4, 4), (8, 4), (12, 4)]


def _layers(pairs):
    """{(chunk key, slot): (blob id, first)} for (chunk, slot, first) triples."""
    return {(KEYS[i], s): (f"b{i}{s}", first) for i, s, first in pairs}


def test_a_full_attention_layer_needs_every_chunk_from_the_start():
    layers = _layers([(0, 0, 0), (1, 0, 0), (3, 0, 0)])  # chunk 2 missing
    assert longest([KV], KEYS, SPANS, layers) == 8
    assert plan([KV], KEYS, SPANS, 8, layers) == Plan(8, ((("b00", 0, 0), ("b10", 0, 4)),))
    assert plan([KV], KEYS, SPANS, 16, layers) is None


def test_a_sliding_layer_needs_only_its_window_and_pieces_that_hold_it():
    # At 16 tokens a window of 6 starts at 10: chunks 2 (from position 10) and 3.
    layers = _layers([(2, 0, 2), (3, 0, 0)])
    assert plan([ROT], KEYS, SPANS, 16, layers) == Plan(16, ((("b20", 2, 8), ("b30", 0, 12)),))
    late = _layers([(2, 0, 3), (3, 0, 0)])  # a piece that lacks position 10
    assert plan([ROT], KEYS, SPANS, 16, late) is None


def test_a_state_layer_lands_only_on_a_checkpoint():
    kv = [(i, 0, 0) for i in range(4)]
    layers = _layers(kv + [(1, 1, 0)])  # a checkpoint after chunk 1 only
    assert longest([KV, STATE], KEYS, SPANS, layers) == 8
    assert plan([KV, STATE], KEYS, SPANS, 8, layers).reads[1] == (("b11", 0, 4),)
    assert longest([KV, STATE], KEYS, SPANS, layers, n_max=7) == 0


def test_nothing_to_restore_is_an_empty_plan():
    assert plan([KV, ROT], KEYS, SPANS, 0, {}) == Plan(0, ((), ()))
    assert longest([KV], KEYS, SPANS, {}) == 0


def test_a_stored_tail_the_request_continues_extends_the_match():
    chunk, model = 4, "ab" * 16
    toks = np.arange(10, dtype="<u4")
    keys = [bytes([9]) * 16, bytes([8]) * 16]  # the request's two full chunks
    tail_key = xxhash.xxh3_128_digest(keys[0] + toks[4:7].tobytes())  # a stored 3-token chunk after chunk 0
    chain = Chain(keys, [(0, 4), (4, 4), (8, 2)], {(keys[0], 0): ("a", 0)}, 4)
    parents = tail_parents(model, chain.keys, chain.n_tokens, int(toks.size), chunk)
    assert parents == {keys[0]: 1, keys[1]: 2}
    rows = [TailRow(tail_key, 3, keys[0], 1), TailRow(b"x" * 16, 2, keys[0], 1)]  # the second does not re-hash
    tails = verified_tails(parents, rows, toks, chain.n_tokens, chunk)
    assert [(t.end, t.chunk, t.key) for t in tails] == [(7, 1, tail_key)]
    longer = extend_by_tail([KV], chain, tails, {(tail_key, 0): ("t", 0)})
    assert (longer.keys, longer.spans, longer.n_tokens) == ([keys[0], tail_key], [(0, 4), (4, 3)], 7)
    assert extend_by_tail([KV], chain, tails, {}) is chain  # the tail's layers are not stored


def test_only_stored_token_ids_that_agree_verify_a_prefix():
    toks = np.arange(8, dtype="<u4")
    spans = [(0, 4), (4, 4)]
    assert agreeing(toks.copy(), toks, spans, 8) == 8
    other = toks.copy()
    other[5] = 99
    assert agreeing(other, toks, spans, 8) == 5
    assert agreeing(None, toks, spans, 8) == 4  # no snapshot lists the chunk: one chunk shorter


def test_the_planner_imports_no_database_driver():
    code = "import sys, kvstore.ops.plan; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
