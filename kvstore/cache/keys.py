"""Chunk addressing: the xxh3-128 hash chain over a model fingerprint and token ids."""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np
import xxhash


def tokens_to_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a little-endian uint32 array (the hashed and stored form)."""
    if tokens is None or isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be a sequence of integer token ids, not {type(tokens).__name__}")
    if type(tokens) is list:
        listed = _int_list(tokens)
        if listed is not None:  # array.array checked every id against uint32's range on the way in
            return np.ascontiguousarray(listed, dtype="<u4")
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if not np.issubdtype(arr.dtype, np.integer):  # floats would be truncated into other token ids
        raise TypeError(f"token ids must be integers, not {arr.dtype}")
    if arr.ndim != 1:
        if arr.ndim != 2 or arr.shape[0] != 1:  # (1, n) is one sequence; a batch is not
            raise ValueError(f"tokens must be one sequence (shape (n,) or (1, n)), not shape {arr.shape}")
        arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return np.ascontiguousarray(arr, dtype="<u4")


# array.array's code of a 4-byte unsigned int ("I" on every platform MLX runs on)
U32_CODE = next(code for code in "ILH" if array.array(code).itemsize == 4)


def _int_list(tokens: list) -> np.ndarray | None:
    """A list of Python ints as uint32, through array.array (5x faster than numpy's per-item conversion: a
    turn's save converts the whole history, issue 23); None for anything numpy would type otherwise."""
    if not tokens or type(tokens[0]) is bool:  # all bools: numpy makes a bool array, refused below
        return None
    try:
        return np.frombuffer(array.array(U32_CODE, tokens), dtype=np.uint32)
    except (TypeError, OverflowError):  # floats, strings, ids outside uint32: numpy's path says what is wrong
        return None


def tokens_from_bytes(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u4").tolist()


def chunk_keys(
    fingerprint: str, tokens: Sequence[int] | np.ndarray, chunk_size: int, known: Sequence[bytes] = ()
) -> list[bytes]:
    """Keys K_0..K_m: K_0 = H(F || chunk_0), K_i = H(K_{i-1} || chunk_i); a trailing partial chunk too.

    A key names the KV of a chunk given its whole prefix, so equal prefixes give equal keys
    in any process. `known`: the keys of the first whole chunks, when the caller has them (a turn's
    save: its previous save's); only the keys after them are hashed.
    """
    data = tokens_to_array(tokens).tobytes()
    step = chunk_size * 4
    keys = list(known)
    prev = keys[-1] if keys else bytes.fromhex(fingerprint)
    digest = xxhash.xxh3_128_digest
    for start in range(len(keys) * step, len(data), step):
        prev = digest(prev + data[start : start + step])
        keys.append(prev)
    return keys


def chunk_spans(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of an n-token sequence."""
    return [(s, min(chunk_size, n_tokens - s)) for s in range(0, n_tokens, chunk_size)]
