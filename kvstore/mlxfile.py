"""mlx-lm's own prompt-cache files (`mlx_lm.cache_prompt`, `--prompt-cache-file`) in and out of a store.

    kvstore.import_mlx_cache(store, "prompt.safetensors", "tech", model=path, tokens=ids, verify=True)
    kvstore.export_mlx_cache(store, "tech", "tech.safetensors", mlx_model=path)  # mlx_lm.generate --prompt-cache-file

mlx-lm writes a safetensors file of each layer's `state` and, in its metadata, the class names
(`mlx_lm.models.cache.load_prompt_cache` then calls `globals()[name]`). Here the file is read with
safetensors alone and each class name is checked against the codec's registry: nothing is looked up
by a name from a file. mlx-lm's files do not hold the token ids; the ones kvstore exports do (metadata
key `kvstore_tokens`), and for the others the caller gives them.

Nothing in a file proves its KV was computed from those token ids, by that model (issue 25, item 1):
its layers are checked against the model (kvstore.mlxfile_check) and the import is kept apart, the
way an unverified archive import is (ops.archive): its chunks live under a namespace of their own
that no other agent's save or restore meets, while the agent itself loads and continues under the
real model. `verify=True` recomputes the KV from the token ids with the model first; a file that
matches is saved like any local cache and shared through the store's content keys.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from kvstore.errors import (
    AgentExistsError,
    ModelMismatchError,
    ReadOnlyStoreError,
    TokenMismatchError,
    UnknownAgentError,
    UnsupportedCacheError,
)
from kvstore.mlxfile_check import TOLERANCE, MlxCacheFileError
from kvstore.names import validate_name

if TYPE_CHECKING:
    from kvstore.records import Snapshot
    from kvstore.store import Store

__all__ = ["import_mlx_cache", "export_mlx_cache", "MlxImport", "MlxCacheFileError", "TOKENS_KEY", "TOLERANCE"]

TOKENS_KEY = "kvstore_tokens"  # metadata: the token ids the cache has seen, as a JSON list
FINGERPRINT_KEY = "kvstore_model"  # metadata: the model fingerprint the cache belongs to
# mlx_lm.generate reads these two with --prompt-cache-file: `model` must equal its --model (or is
# loaded when none is given), `tokenizer_config` is JSON; mlx_lm.cache_prompt writes
# {"trust_remote_code": false} by default, and so does export.
TOKENIZER_CONFIG = json.dumps({"trust_remote_code": False})


@dataclass(frozen=True)
class MlxImport:
    """What import_mlx_cache did."""

    snapshot: Snapshot  # the agent's new head
    verified: bool  # True: recomputed and matched, shared like any saved cache; False: kept apart
    error: float | None  # verified: the largest relative L2 error of any layer's keys or values
    tolerance: float  # the relative error a verification allows


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's arrays and metadata. safetensors checks the header (every tensor's bytes in the file,
    none overlapping); MLX reads the arrays (safetensors' numpy path has no bfloat16, the dtype of most
    mlx-lm models' caches)."""
    import mlx.core as mx
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
        loaded = mx.load(str(path), format="safetensors", return_metadata=True)
        arrays: dict[str, Any] = loaded[0]  # type: ignore[assignment,index]  # (arrays, metadata) with return_metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise MlxCacheFileError(f"{path} is not a safetensors file: {e}") from None
    if set(arrays) != names:
        raise MlxCacheFileError(f"{path} is not a safetensors file kvstore can read (its tensors differ by reader)")
    return arrays, meta


def _offset(path: Path, i: int, array: Any) -> int:
    """Layer i's offset: mlx-lm saves it as a scalar integer array (issue 25, item 12: name file and layer)."""
    import mlx.core as mx

    if array.size != 1 or not mx.issubdtype(array.dtype, mx.integer):
        raise MlxCacheFileError(
            f"{path} layer {i}: its offset is an array of {str(array.dtype).removeprefix('mlx.core.')} "
            f"of shape {tuple(array.shape)}, not one whole number"
        )
    return int(array.reshape(-1)[0].item())


def read_mlx_cache(file: str | os.PathLike) -> tuple[list, dict[str, str], list[int] | None]:
    """(cache, the file's user metadata, the token ids it records or None) of an mlx-lm prompt-cache file."""
    import mlx.core as mx

    from kvstore.cache import codec

    path = Path(file)
    arrays, meta = _read(path)
    classes = {int(k[2:]): v for k, v in meta.items() if k.startswith("1.") and k[2:].isdigit()}
    if not classes or sorted(classes) != list(range(len(classes))):
        raise MlxCacheFileError(f"{path} is not an mlx-lm prompt-cache file (no cache classes in its metadata)")
    user = {k[2:]: v for k, v in meta.items() if k.startswith("0.")}
    cache = []
    for i in range(len(classes)):
        name = classes[i]
        if name not in codec.KNOWN_CLASSES:
            raise UnsupportedCacheError(f"{path} layer {i} is a {name!r}, not a cache class kvstore knows")
        if name != "KVCache":
            raise UnsupportedCacheError(
                f"{path} layer {i} is a {name}: importing mlx-lm files supports KVCache "
                "layers (mlx_lm.cache_prompt without --kv-bits or --max-kv-size)"
            )
        try:
            keys, values, offset = arrays[f"{i}.0"], arrays[f"{i}.1"], _offset(path, i, arrays[f"{i}.2"])
        except KeyError as e:
            raise MlxCacheFileError(f"{path} lacks layer {i}'s array {e.args[0]}") from None
        if keys.ndim != 4 or values.ndim != 4 or not 0 <= offset <= min(keys.shape[2], values.shape[2]):
            raise MlxCacheFileError(
                f"{path} layer {i}: offset {offset} does not fit keys {keys.shape} and values {values.shape}"
            )
        c = codec.known_class(name)()
        c.keys = mx.array(keys[..., :offset, :])
        c.values = mx.array(values[..., :offset, :])
        c.offset = offset
        cache.append(c)
    offsets = {c.offset for c in cache}
    if len(offsets) > 1:
        raise MlxCacheFileError(f"{path}: its layers hold different numbers of tokens ({sorted(offsets)})")
    tokens = None
    if TOKENS_KEY in user:
        try:
            tokens = [int(t) for t in json.loads(user[TOKENS_KEY])]
        except (ValueError, TypeError):
            raise MlxCacheFileError(f"{path}: its {TOKENS_KEY} metadata is not a JSON list of ints") from None
    return cache, user, tokens


def _model_of(model: Any) -> tuple[Any, str]:
    """(loaded model, fingerprint) of a model folder, a loaded model or `(model, tokenizer)` pair, or a
    kvstore.agents model handle (which knows the fingerprint its agents store under)."""
    from kvstore.cache.fingerprint import fingerprint

    if isinstance(model, str) and len(model) == 32 and all(c in "0123456789abcdef" for c in model):
        raise TypeError(
            "import_mlx_cache needs the model itself (a model folder or a loaded model), not only its "
            "fingerprint: the file's KV is checked against the model's layers"
        )
    if isinstance(model, (str, os.PathLike)):
        from mlx_lm import load

        fp = fingerprint(model)  # first: a folder that does not exist is an error, not a hub download
        return load(str(model))[0], fp
    if isinstance(model, (tuple, list)) and model:
        return model[0], fingerprint(model[0])
    handle_fp = getattr(model, "fingerprint", None)
    if isinstance(handle_fp, str) and hasattr(model, "model"):
        return model.model, handle_fp
    return model, fingerprint(model)


def _exists(store: Store, name: str) -> bool:
    try:
        store.agent(name)
    except UnknownAgentError:
        return False
    return True


def _file_digest(path: Path) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.digest()


def import_mlx_cache(
    store: Store,
    file: str | os.PathLike,
    name: str,
    *,
    model: Any,
    tokens: Sequence[int] | None = None,
    meta: dict | None = None,
    verify: bool = False,
) -> MlxImport:
    """Save the cache of an mlx-lm prompt-cache file as the head of a new agent `name`.

    The file's layers are checked against the model (count, class, heads, head sizes, dtype, finite
    values). Unverified, the import is private to `name`: no other agent's save or restore uses its
    chunks. With `verify`, the token ids are prefilled with the model and each layer compared within
    TOLERANCE; the import is then shared like any saved cache.

    Args:
        model: the model that made the file: a model folder, a loaded model or `(model, tokenizer)`
            pair, or a `kvstore.agents` model handle (its fingerprint is the one the agents use).
        tokens: the token ids the cache has seen; needed when the file does not record them (files
            written by mlx-lm itself), checked against them when it does.
        meta: the agent's metadata (default: where it came from).
        verify: recompute the KV from `tokens` and refuse the file unless it matches.
    """
    from kvstore import mlxfile_check
    from kvstore.ops import save
    from kvstore.ops.archive import namespace_of

    validate_name(name)
    if store.readonly:
        raise ReadOnlyStoreError(f"the store at {store.path} is read-only: exports work, imports do not")
    if _exists(store, name):  # an import starts a new agent, as `kvstore import` does
        raise AgentExistsError(
            f"an agent named {name!r} already exists in this store: import the file under another name, "
            "or remove the existing agent first"
        )
    path = Path(file)
    cache, user, recorded = read_mlx_cache(path)
    loaded, fp = _model_of(model)
    claimed = user.get(FINGERPRINT_KEY)
    if claimed is not None and claimed != fp:
        raise ModelMismatchError(f"{path} says it holds KV of model {claimed}, not of the model given ({fp})")
    if tokens is None:
        if recorded is None:
            raise TokenMismatchError(
                f"{path} does not record its token ids (mlx-lm's files do not): give the tokens the cache was made from"
            )
        tokens = recorded
    tokens = [int(t) for t in tokens]
    if recorded is not None and recorded != tokens:
        raise TokenMismatchError(f"the tokens given differ from the {len(recorded)} token ids {path} records")
    seen = cache[0].offset if cache else 0
    if len(tokens) != seen:
        raise TokenMismatchError(f"{path} holds a cache of {seen} tokens, but {len(tokens)} token ids were given")
    mlxfile_check.check_layers(path, cache, mlxfile_check.model_layers(loaded))
    if meta is None:
        meta = {
            "imported_from": path.name,
            "mlx_lm_metadata": {k: v for k, v in user.items() if k not in (TOKENS_KEY, "tokenizer_config")},
        }
    if verify:
        error = mlxfile_check.verify_kv(path, cache, tokens, loaded, store.chunk_size)
        snap = store.save(name, cache, tokens, model=fp, meta=meta)
        return MlxImport(snapshot=snap, verified=True, error=error, tolerance=TOLERANCE)
    # Kept apart: a namespace of the model's, this agent's and this file's own.
    salted = namespace_of(fp, b"mlx-lm file\0" + name.encode() + b"\0" + _file_digest(path))
    snap = save.save(store, name, cache, tokens, model=fp, meta=meta, namespace=salted)
    return MlxImport(snapshot=snap, verified=False, error=None, tolerance=TOLERANCE)


def export_mlx_cache(
    store: Store,
    name: str,
    file: str | os.PathLike,
    *,
    model: Any = None,
    mlx_model: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write agent `name`'s head as an mlx-lm prompt-cache file (`mlx_lm.models.cache.load_prompt_cache`
    and `mlx_lm.generate --prompt-cache-file` read it). Returns the number of tokens it holds.

    Args:
        model: if given, the agent must belong to it (as in Store.load).
        mlx_model: the model path or Hugging Face id mlx-lm is to load, written as the file's `model`
            metadata: `mlx_lm.generate` refuses a --model other than it, and loads it when none is given
            (default: the name the store records for the model).
    """
    from mlx_lm.models.cache import save_prompt_cache

    from kvstore.ops.accounting import model_names

    target = Path(file)
    if target.exists() and not overwrite:
        raise FileExistsError(17, "the file already exists: choose another one or overwrite it", str(target))
    if not target.parent.is_dir():
        raise FileNotFoundError(2, "the folder does not exist", str(target.parent))
    if target.suffix != ".safetensors":
        raise ValueError(f"{target}: mlx-lm's prompt-cache files end in .safetensors")
    cache, tokens = store.load(name, model=model)
    fp = store.agent(name).model
    metadata = {
        "model": mlx_model or model_names(store).get(fp) or fp,
        "tokenizer_config": TOKENIZER_CONFIG,
        FINGERPRINT_KEY: fp,
        TOKENS_KEY: json.dumps(tokens),
    }
    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return len(tokens)
