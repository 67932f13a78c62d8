"""Model fingerprints: xxh3-128 over everything that changes KV values.

A cache made by one model must never be loaded into another, so the fingerprint covers the
canonical config, the identity of every weight file (name, size, content hash), the dtype, the KV
quantization settings and the format version.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import xxhash

from kvstore.formats import FORMAT_VERSION

# Config keys that do not change a single KV value (bookkeeping written by tools).
_COSMETIC_KEYS = {"_name_or_path", "transformers_version", "architectures", "kvstore_builtin", "auto_map"}
_WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf", ".bin")
_cache_lock = threading.Lock()
_names: dict[str, str] = {}  # fingerprint -> a human name for it, from the folder or model it was computed from


def model_name(fp: str) -> str | None:
    """A readable name for a fingerprint this process computed (None if it only saw the hex string).

    Stored as the model's name hint when a store first records the model: `kvstore models` shows it.
    """
    return _names.get(fp)


def _name_of_directory(path: Path) -> str:
    """`org/model` for a Hugging Face hub snapshot folder, else the folder's own name."""
    parts = path.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/")
    return path.resolve().name


def _hash_cache_path() -> Path:
    root = os.environ.get("KVSTORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvstore")
    return Path(root) / "weight-hashes.json"


def _file_hash(path: Path) -> str:
    """xxh3-128 of a weight file, cached by (path, mtime, size): hashing 16 GB on every open is too slow."""
    st = path.stat()
    cache_key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}"
    cache_file = _hash_cache_path()
    with _cache_lock:
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        if cache_key in cached:
            return cached[cache_key]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    with _cache_lock:
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        cached[cache_key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    return digest


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _from_directory(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in _COSMETIC_KEYS}
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"{path} has no weight files")
    files = [[p.name, p.stat().st_size, _file_hash(p)] for p in weights]
    return {"config": config, "weights": files}


def _host_bytes(value) -> memoryview:
    """A parameter's bytes, zero-copy (bf16 viewed as uint16, which numpy can hold)."""
    import mlx.core as mx
    import numpy as np

    if value.dtype == mx.bfloat16:
        value = value.view(mx.uint16)
    return memoryview(np.asarray(value)).cast("B")


def _params(model: Any) -> list:
    from mlx.utils import tree_flatten

    return sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])


def _from_module(params: list, model: Any) -> dict:
    """Identity of an already loaded mlx model: its args and a hash of every parameter."""
    h = xxhash.xxh3_128()
    names = []
    for name, value in params:
        names.append([name, list(value.shape), str(value.dtype)])
        h.update(_host_bytes(value))
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    config = {k: v for k, v in config.items() if k not in _COSMETIC_KEYS}
    return {"config": config, "params": names, "params_hash": h.hexdigest()}


SAMPLES_PER_PARAM = 4096  # bytes of each parameter the memo's check reads, evenly spread


def _sample_signature(params: list) -> bytes:
    """A cheap check that the parameters are the ones the memo hashed: names, shapes, dtypes and an
    evenly spread sample of each one's bytes (about 1 MB for a 300-tensor model, ~1 ms).

    `load_weights`, `model.update`, fusing an adapter and an optimizer step all replace the arrays
    with others whose values differ almost everywhere, which the sample sees. Object ids and buffer
    addresses would not do: the allocator hands a freed weight's buffer to its replacement.
    """
    import numpy as np

    h = xxhash.xxh3_128()
    for name, value in params:
        h.update(f"{name}|{tuple(value.shape)}|{value.dtype};".encode())
        raw = np.frombuffer(_host_bytes(value), dtype=np.uint8)
        step = max(1, raw.size // SAMPLES_PER_PARAM)
        h.update(raw[::step].tobytes())
        h.update(raw[-64:].tobytes())
    return h.digest()


def fingerprint(
    model: Any,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int | None = None,
    kv_phase: str | None = None,
    dtype: str | None = None,
) -> str:
    """Fingerprint (32 hex chars) of a model directory, a `(model, tokenizer)` pair or a loaded model.

    `kv_bits`/`kv_group_size`/`quantized_kv_start` name the KV quantization the caches use, as
    mlx-lm's generate takes them (kv_bits None: not quantized); `kv_phase` "full-precision" names
    the caches of those settings that have not reached quantized_kv_start yet (kvstore.agents.kv);
    `dtype` the dtype the model computes in, where it differs from its weights.
    """
    if isinstance(model, (tuple, list)) and model:
        model = model[0]
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        ident = _from_directory(path)
        name = _name_of_directory(path)
    else:
        # The full hash reads every weight (~0.1 s per GB); the memo on the model object is only
        # reused while its parameters still match it (issue 15, item 2: after load_weights the
        # old weights' KV came back).
        params = _params(model)
        signature = _sample_signature(params)
        cached = getattr(model, "_kvstore_identity", None)
        if cached is None or cached[0] != signature:
            cached = (signature, _from_module(params, model))
            try:
                object.__setattr__(model, "_kvstore_identity", cached)
            except (AttributeError, TypeError):
                pass
        ident = cached[1]
        name = getattr(getattr(model, "args", None), "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
    ident = dict(
        ident, dtype=dtype, kv_bits=kv_bits, kv_group_size=kv_group_size if kv_bits else None, format=FORMAT_VERSION
    )
    if kv_bits and quantized_kv_start is not None:  # (absent otherwise: earlier fingerprints stay as they were)
        ident["quantized_kv_start"] = quantized_kv_start
    if kv_bits and kv_phase is not None:
        ident["kv_phase"] = kv_phase
    fp = xxhash.xxh3_128_hexdigest(_canonical(ident))
    _names.setdefault(fp, name)
    return fp
