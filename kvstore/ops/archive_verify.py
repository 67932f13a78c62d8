"""Checking an archive's KV against the model: the only way to know it belongs to its token ids.

A blob's hash proves its bytes arrived intact, and its chunk key proves which token ids the
archive *says* it holds; neither proves the KV was computed from those tokens. An archive whose
token ids were relabelled (keys re-derived, blobs unchanged) passes every other check (issue 15,
item 1). `verify_kv` prefills each snapshot's tokens cold, in the store's chunk-aligned steps, and
compares every layer row of every chunk with the KV the model computed, within float tolerance.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any

import mlx.core as mx
import numpy as np

from kvstore.blob import tensorfile
from kvstore.cache import codec
from kvstore.cache.fingerprint import fingerprint
from kvstore.cache.keys import chunk_spans
from kvstore.cache.leaves import arrays_of
from kvstore.errors import ArchiveError
from kvstore.index.commit import LayerRow
from kvstore.ops.archive_manifest import ArchivePlan
from kvstore.ops.archive_tar import read_member

# Relative L2 error allowed per array: a chunk-aligned cold prefill on another machine or BLAS
# differs from the exporter's in the last bits of bf16 (~4e-3 relative); KV of other tokens differs
# by about its own size.
TOLERANCE = 2e-2


def _refuse(msg: str) -> ArchiveError:
    return ArchiveError(
        f"the archive's KV does not verify against the model: {msg}; nothing was imported "
        "(import it without verification to keep it apart from this store's own caches)"
    )


def _close(live: mx.array, stored: mx.array) -> bool:
    a = np.asarray(live.astype(mx.float32))
    b = np.asarray(stored.astype(mx.float32))
    if a.shape != b.shape:
        return False
    scale = float(np.linalg.norm(b))
    return bool(np.isfinite(a).all()) and float(np.linalg.norm(a - b)) <= TOLERANCE * max(scale, 1e-6)


def _floats(slot: codec.Slot, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    """A positional piece as float keys and values (a quantized piece dequantized)."""
    if slot.cls != "QuantizedKVCache":
        return arrays
    p = dict(slot.params)
    return {
        kv: mx.dequantize(
            arrays[f"{kv}0"], arrays[f"{kv}1"], arrays[f"{kv}2"], group_size=p["group_size"], bits=p["bits"]
        )
        for kv in ("k", "v")
    }


def _check_row(row: LayerRow, start: int, end: int, slots, leaves, blob: tuple[dict, dict]) -> None:
    arrays, meta = blob
    s = row.layer
    slot, leaf = slots[s], leaves[s]
    where = f"layer {s} of chunk {row.chunk_key.hex()} (positions {start}-{end})"
    if meta.get("kind") == "state":
        live, _meta = codec.extract_state(slot, leaf, end)
        stored = arrays
    else:
        lo, hi = codec.held_range(slot, leaf)
        if start + row.first < lo or end > hi:
            raise _refuse(f"{where} cannot be recomputed: the model's window no longer holds it")
        live = _floats(slot, codec.extract(slot, leaf, start + row.first, end))
        stored = _floats(
            slot, {name.split(".", 1)[1]: a for name, a in arrays.items() if name.split(".", 1)[0] == str(s)}
        )
    if set(live) != set(stored) or not all(_close(live[n], stored[n]) for n in live):
        raise _refuse(f"{where} is not what the model computes from the archive's token ids")


def verify_kv(
    plan: ArchivePlan, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], model: Any, chunk_size: int
) -> int:
    """Recompute the archive's KV with `model` and compare every layer row; returns the chunks checked.

    `model` is a model folder (loaded here) or a loaded mlx-lm model; its fingerprint must be the
    archive's (a folder and the model loaded from it fingerprint differently: pass what the
    archive's agent was saved with). Raises ArchiveError if it is another model or any row differs.
    """
    from mlx_lm.models.cache import make_prompt_cache

    fp = fingerprint(model)
    if fp != plan.fingerprint:
        raise ArchiveError(
            f"the model given to verify the archive has fingerprint {fp}, not the "
            f"archive's {plan.fingerprint}; nothing was imported"
        )
    if isinstance(model, (str, os.PathLike)):
        from mlx_lm import load

        model = load(str(model))[0]
    elif isinstance(model, (tuple, list)):
        model = model[0]
    rows_of: dict[bytes, list[LayerRow]] = {}
    for r in plan.layers:
        rows_of.setdefault(r.chunk_key, []).append(r)
    checked: set[bytes] = set()
    for sn in sorted(plan.snapshots, key=lambda sn: -sn.tokens.size):
        if all(k in checked for k in sn.keys):
            continue  # a prefix of a snapshot already recomputed
        cache = make_prompt_cache(model)
        tree, slots, leaves = codec.describe(cache)
        if json.dumps(codec.layout_json(tree, slots), sort_keys=True) != plan.layout:
            raise ArchiveError(
                "the model given to verify the archive makes caches of another layout than the "
                "archive's (KV quantization?); nothing was imported"
            )
        for key, (start, length) in zip(sn.keys, chunk_spans(int(sn.tokens.size), chunk_size)):
            model(mx.array(sn.tokens[start : start + length].astype(np.int32))[None], cache=cache)
            mx.eval(arrays_of(leaves))  # one step at a time: a lazy graph over every chunk would hold them all
            if key in checked:
                continue
            blobs: dict[str, tuple[dict, dict]] = {}
            for row in rows_of.get(key, []):
                if row.blob_id not in blobs:
                    data = read_member(tar, members[row.blob_id])
                    blobs[row.blob_id] = tensorfile.decode(data, row.blob_id)
                _check_row(row, start, start + length, slots, leaves, blobs[row.blob_id])
            checked.add(key)
    return len(checked)
