"""mlx-lm's own prompt-cache files (`mlx_lm.cache_prompt`, `--prompt-cache-file`) in and out of a store.

    kvstore.import_mlx_cache(store, "prompt.safetensors", "tech", model=fp, tokens=ids)
    kvstore.export_mlx_cache(store, "tech", "tech.safetensors")   # then: mlx_lm.generate --prompt-cache-file ...

mlx-lm writes a safetensors file of each layer's `state` and, in its metadata, the class names
(`mlx_lm.models.cache.load_prompt_cache` then calls `globals()[name]`). Here the file is read with
safetensors alone and each class name is checked against the codec's registry: nothing is looked up
by a name from a file. mlx-lm's files do not hold the token ids; the ones kvstore exports do (metadata
key `kvstore_tokens`), and for the others the caller gives them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.errors import StoreError, TokenMismatchError, UnsupportedCacheError

if TYPE_CHECKING:
    from kvstore.records import Snapshot
    from kvstore.store import Store

__all__ = ["import_mlx_cache", "export_mlx_cache", "TOKENS_KEY"]

TOKENS_KEY = "kvstore_tokens"  # metadata: the token ids the cache has seen, as a JSON list
FINGERPRINT_KEY = "kvstore_model"  # metadata: the model fingerprint the cache belongs to


class MlxCacheFileError(StoreError, ValueError):
    """The file is not an mlx-lm prompt-cache file kvstore can read."""


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="mlx") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise MlxCacheFileError(f"{path} is not a safetensors file: {e}") from None
    return arrays, meta


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
            keys, values, offset = arrays[f"{i}.0"], arrays[f"{i}.1"], int(arrays[f"{i}.2"].item())
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
    tokens = None
    if TOKENS_KEY in user:
        try:
            tokens = [int(t) for t in json.loads(user[TOKENS_KEY])]
        except (ValueError, TypeError):
            raise MlxCacheFileError(f"{path}: its {TOKENS_KEY} metadata is not a JSON list of ints") from None
    return cache, user, tokens


def import_mlx_cache(
    store: Store,
    file: str | os.PathLike,
    name: str,
    *,
    model: Any,
    tokens: Sequence[int] | None = None,
    meta: dict | None = None,
) -> Snapshot:
    """Save the cache of an mlx-lm prompt-cache file as agent `name`'s new head.

    Args:
        model: the model that made the file (a fingerprint, model folder or loaded model).
        tokens: the token ids the cache has seen; needed when the file does not record them (files
            written by mlx-lm itself), checked against them when it does.
        meta: the agent's metadata (default: where it came from).
    """
    cache, user, recorded = read_mlx_cache(file)
    if tokens is None:
        if recorded is None:
            raise TokenMismatchError(
                f"{file} does not record its token ids (mlx-lm's files do not): give the tokens the cache was made from"
            )
        tokens = recorded
    tokens = [int(t) for t in tokens]
    if recorded is not None and recorded != tokens:
        raise TokenMismatchError(f"the tokens given differ from the {len(recorded)} token ids {file} records")
    seen = cache[0].offset if cache else 0
    if len(tokens) != seen:
        raise TokenMismatchError(f"{file} holds a cache of {seen} tokens, but {len(tokens)} token ids were given")
    if meta is None:
        meta = {
            "imported_from": os.path.basename(os.fspath(file)),
            "mlx_lm_metadata": {k: v for k, v in user.items() if k not in (TOKENS_KEY, "tokenizer_config")},
        }
    return store.save(name, cache, tokens, model=model, meta=meta)


def export_mlx_cache(
    store: Store, name: str, file: str | os.PathLike, *, model: Any = None, overwrite: bool = False
) -> int:
    """Write agent `name`'s head as an mlx-lm prompt-cache file (`mlx_lm.models.cache.load_prompt_cache`
    and `mlx_lm.generate --prompt-cache-file` read it). Returns the number of tokens it holds."""
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
    metadata = {"model": model_names(store).get(fp) or fp, FINGERPRINT_KEY: fp, TOKENS_KEY: json.dumps(tokens)}
    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return len(tokens)
