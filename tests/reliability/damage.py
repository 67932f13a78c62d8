"""Shared helpers for the corruption and disk-full tests: a populated store, and what it must give back."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

import kvstore

from . import synth


@dataclass
class Expect:
    """What a store must restore: heads (agent -> tokens) and labelled snapshots (id -> (agent, tokens))."""

    heads: dict[str, list[int]] = field(default_factory=dict)
    labelled: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    def snapshots(self, store: kvstore.Store) -> dict[int, tuple[str, list[int]]]:
        """Every snapshot to check: the labelled ones and each agent's head."""
        out = dict(self.labelled)
        for name, tokens in self.heads.items():
            out[store.agent(name).head] = (name, tokens)
        return out


def populate(store: kvstore.Store, agents: int = 6, seed: int = 5) -> Expect:
    """Agents sharing prompts; a0 also has a labelled older snapshot and an incremental head."""
    rng = random.Random(seed)
    exp = Expect()
    for i in range(agents):
        tokens = synth.agent_tokens(rng)
        snap = store.save(
            f"a{i}",
            synth.make_cache(tokens),
            tokens,
            model=synth.FP,
            label="first" if i == 0 else None,
            meta={"role": f"agent {i}"},
        )
        exp.heads[f"a{i}"] = tokens
        if i == 0:
            exp.labelled[snap.id] = ("a0", tokens)
    more = exp.heads["a0"] + [rng.randrange(5000) for _ in range(30)]
    cache, _ = store.load("a0", model=synth.FP)
    store.save("a0", synth.extend(cache, exp.heads["a0"], more, rng), more, model=synth.FP)
    exp.heads["a0"] = more
    return exp


def blobs_by_snapshot(store: kvstore.Store) -> dict[int, set[str]]:
    """snapshot id -> the blob ids its chunks use (read straight from the index)."""
    out: dict[int, set[str]] = {}
    with store.engine.connect() as conn:
        for sid, blob in conn.execute(
            text(
                "SELECT sc.snapshot_id, cl.blob_id FROM snapshot_chunks sc "
                "JOIN chunk_layers cl ON cl.chunk_key = sc.chunk_key"
            )
        ):
            out.setdefault(sid, set()).add(blob)
    return out


def token_history(store: kvstore.Store) -> dict[int, tuple[str, list[int]]]:
    """snapshot id -> (agent, token ids): the primary record, read straight from the index."""
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT s.id, a.name, s.tokens FROM snapshots s JOIN agents a ON a.id = s.agent_id"))
        return {sid: (name, kvstore.cache.keys.tokens_from_bytes(bytes(tokens))) for sid, name, tokens in rows}


def check_restores(store: kvstore.Store, snaps: dict[int, tuple[str, list[int]]]) -> dict[int, str]:
    """Load every snapshot: "ok" when bit-exact, else the StoreError's class name. A wrong cache fails."""
    out = {}
    for sid, (name, tokens) in snaps.items():
        try:
            cache, got = store.load(name, model=synth.FP, snapshot=sid)
        except kvstore.StoreError as e:
            out[sid] = type(e).__name__
            continue
        assert got == tokens, f"snapshot {sid} of {name}: wrong tokens"
        assert synth.checksum(cache) == synth.expected_sum(tokens), f"snapshot {sid} of {name}: wrong cache"
        out[sid] = "ok"
    return out


def check_prefix_restores(store: kvstore.Store, heads: dict[str, list[int]]) -> int:
    """restore() of each head's tokens: a bit-exact prefix, or a StoreError. Returns how many errored."""
    errors = 0
    for tokens in heads.values():
        try:
            cache, n = store.restore(tokens, model=synth.FP)
        except kvstore.StoreError:
            errors += 1
            continue
        assert n == 0 or synth.checksum(cache) == synth.expected_sum(tokens[:n]), "restore gave a wrong cache"
    return errors


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))
