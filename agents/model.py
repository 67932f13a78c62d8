"""The model an agent manager runs: resolved from a name, a path, a Hugging Face id or a loaded pair.

Names: "smollm2-135m-instruct" (a real instruct model, fetched once and converted offline; see
kvstore.models), and "builtin" / "builtin:ARCH" / "builtin:ARCH-SIZE" (the random-weight models of
kvstore.models.builtin, e.g. "builtin:gemma3-small" or "builtin:qwen3_next-tiny"; "builtin" is the
Llama-style "tiny" one).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore import fingerprint
from kvstore.models import MODELS, ModelLoadError

BUILTIN = "builtin"
BUILTIN_DEFAULT = ("llama", "tiny")  # as `kvstore chat --model builtin`


@dataclass
class ModelHandle:
    """A loaded mlx-lm model, its tokenizer, and the fingerprint its caches are stored under."""

    model: Any
    tokenizer: Any
    fingerprint: str
    name: str
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the model's parameters."""
        from mlx.utils import tree_flatten

        params = tree_flatten(self.model.parameters())  # a list of (name, array); mlx's hints say list | dict
        return sum(v.nbytes for _, v in params)  # type: ignore[str-unpack, union-attr]

    def fingerprint_with(self, **settings) -> str:
        """The fingerprint of this model with other settings (KV quantization: kvstore.fingerprint's keywords)."""
        return fingerprint(self.path if self.path is not None else self.model, **settings)

    def make_cache(self) -> list:
        """A fresh, empty prompt cache for this model."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)


def is_builtin(ref: Any) -> bool:
    """Whether ref names a built-in model: "builtin", "builtin:ARCH" or "builtin:ARCH-SIZE"."""
    return isinstance(ref, str) and (ref == BUILTIN or ref.startswith(BUILTIN + ":"))


def builtin_dir(ref: str) -> Path:
    """The folder of a built-in random-weight model named "builtin[:ARCH[-SIZE]]" (built on first use)."""
    from kvstore.models.builtin import ARCHITECTURES, SIZES, builtin_model_path

    spec = ref.partition(":")[2]
    arch, _, size = spec.partition("-")  # "" for bare "builtin": the defaults below
    arch, size = arch or BUILTIN_DEFAULT[0], size or BUILTIN_DEFAULT[1]
    if arch not in ARCHITECTURES or size not in SIZES:
        raise ModelLoadError(
            f"unknown built-in model {ref!r}: use builtin:ARCH-SIZE with ARCH one of "
            f"{', '.join(ARCHITECTURES)} and SIZE one of {', '.join(SIZES)}"
        )
    return builtin_model_path(arch=arch, size=size)


def _local_dir(ref: str) -> Path:
    """A local model folder for a model name, a path or a Hugging Face id (the hub cache; downloads when online)."""
    if ref in MODELS:
        from kvstore.models import ensure_model

        return ensure_model(ref, say=lambda s: print(s, file=sys.stderr, flush=True))
    if is_builtin(ref):
        return builtin_dir(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not an mlx-lm model folder (no config.json)")
        return path
    if ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1):
        raise ModelLoadError(
            f"no model at {ref}: give a model folder, a Hugging Face id such as "
            f"mlx-community/Llama-3.2-1B-Instruct-4bit, or a name: {', '.join(MODELS)}, builtin"
        )
    from mlx_lm.utils import _download

    try:
        return Path(_download(ref))
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise ModelLoadError(
            f"cannot get model {ref!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it while online, or pass a local model folder"
        ) from e


def resolve_model(model: Any) -> ModelHandle:
    """A ModelHandle for a model name, a folder, a Hugging Face id, a `(model, tokenizer)` pair or a ModelHandle."""
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = _local_dir(os.fspath(model))
        from mlx_lm import load

        try:
            loaded, tokenizer = load(str(path))[:2]
        except Exception as e:  # mlx-lm raises ValueError/KeyError/OSError for unsupported or broken models
            raise ModelLoadError(f"mlx-lm cannot load the model in {path}: {e}") from e
        return ModelHandle(loaded, tokenizer, fingerprint(path), name=str(model), path=path)
    if isinstance(model, (tuple, list)) and len(model) == 2:
        loaded, tokenizer = model
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        return ModelHandle(loaded, tokenizer, fingerprint(loaded), name=type(loaded).__module__)
    raise TypeError(
        "model must be a model folder, a Hugging Face id, or a (model, tokenizer) pair "
        f"from mlx_lm.load, not {type(model).__name__}"
    )
