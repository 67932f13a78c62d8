"""Safetensors bytes to and from mlx arrays, without a temporary file.

The blob store hashes the exact bytes it writes, so the file is built in memory here rather
than by `mx.save_safetensors`. bfloat16 travels through numpy as uint16 (numpy has no bf16).
"""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np

from .errors import CorruptBlobError

_TO_ST = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64",
    mx.uint64: "U64", mx.bool_: "BOOL", mx.float64: "F64",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
       "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "I64": np.int64,
       "U64": np.uint64, "BOOL": np.bool_, "F64": np.float64}


def _as_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def encode(arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> list:
    """Safetensors file contents as a list of buffers (header, then each tensor's bytes)."""
    header: dict = {}
    datas = []
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype not in _TO_ST:
            raise TypeError(f"dtype {a.dtype} cannot be stored")
        data = np.ascontiguousarray(_as_numpy(a))
        header[name] = {"dtype": _TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        datas.append(memoryview(data).cast("B") if data.nbytes else b"")
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return [struct.pack("<Q", len(raw)) + raw, *datas]


def decode(data: bytes | bytearray, blob_id: str = "?") -> tuple[dict[str, mx.array], dict[str, str]]:
    """Arrays and metadata from safetensors bytes; a malformed file is a CorruptBlobError."""
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(bytes(data[8 : 8 + n]))
        base = 8 + n
        metadata = header.pop("__metadata__", {}) or {}
        arrays = {}
        for name, info in header.items():
            st = info["dtype"]
            begin, end = info["data_offsets"]
            count = (end - begin) // np.dtype(_NP[st]).itemsize
            if base + end > len(data):
                raise ValueError("tensor data past the end of the file")
            view = np.frombuffer(data, dtype=_NP[st], count=count, offset=base + begin)
            arr = mx.array(view.reshape(info["shape"]))
            if st == "BF16":
                arr = arr.view(mx.bfloat16)
            arrays[name] = arr
        return arrays, metadata
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptBlobError(f"blob {blob_id} does not parse as safetensors: {e}", blob_id) from e
