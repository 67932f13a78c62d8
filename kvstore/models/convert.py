"""A GGUF file (llama architecture) converted to an mlx-lm model folder, with no torch.

    from kvstore.models.convert import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-folder", dtype="float32")

Reads with ggml's own reader (``gguf.GGUFReader``), dequantizes with ``gguf.quants.dequantize``, and
undoes what llama.cpp's converter did to the checkpoint: shapes are stored fastest dimension first
(reversed here), and the rows of ``attn_q`` / ``attn_k`` were permuted per head from the Hugging Face
rotate-half layout to llama.cpp's interleaved one ([2, d/2] -> [d/2, 2]); they are permuted back. The
folder gets config.json, model.safetensors and the tokenizer files (vocab.py). Everything is checked
before anything is written; the caller writes into a temp folder (fetch.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .vocab import tokenizer_files

DTYPES = ("float32", "float16", "bfloat16")
# GGML types gguf.quants.dequantize reads (F32/F16/BF16 are plain arrays)
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> mlx-lm parameter name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_gguf(path: str | Path):
    """(GGUFReader, metadata dict) for path; ModelFileError if it is not a complete GGUF file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:  # what the reader raises on bad bytes
        raise ModelFileError(
            f"{path} is not a readable GGUF file: truncated or damaged ({type(e).__name__}: {e})"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:  # a truncated file can still parse: its last tensors run past the end
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelFileError(
                f"{path} is truncated: tensor {t.name} needs bytes up to "
                f"{t.data_offset + t.n_bytes:,}, the file has {size:,}"
            )
    return reader, meta


def _config(meta: dict, source: str, tied: bool, dtype: str) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFileError(
            f"{source}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    try:
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        c = dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            hidden_act="silu",
            hidden_size=hidden,
            num_hidden_layers=int(meta[f"{arch}.block_count"]),
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=hidden // heads,
            rms_norm_eps=float(f"{meta[f'{arch}.attention.layer_norm_rms_epsilon']:.7g}"),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
            vocab_size=len(meta["tokenizer.ggml.tokens"]),
            tie_word_embeddings=tied,
            torch_dtype=dtype,
        )
    except KeyError as e:
        raise ModelFileError(f"{source}: metadata field {e.args[0]} is missing") from e
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", c["head_dim"]))
    if rope_dims != c["head_dim"]:
        raise ModelFileError(
            f"{source}: partial rotary embeddings ({rope_dims} of {c['head_dim']} dimensions) are not supported"
        )
    if f"{arch}.rope.scaling.type" in meta:
        raise ModelFileError(f"{source}: rope scaling ({meta[f'{arch}.rope.scaling.type']}) is not supported")
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            c[name] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return dict(sorted(c.items()))


def _plan(reader, source: str) -> dict:
    """{gguf tensor: mlx-lm name}; refuses unknown tensors and types before anything is dequantized."""
    plan = {}
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelFileError(
                f"{source}: tensor {t.name} has quantization type {t.tensor_type.name}, which "
                f"is not supported (supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
        parts = t.name.split(".", 2)
        if t.name in TOP_TENSORS:
            plan[t.name] = TOP_TENSORS[t.name]
        elif parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
            plan[t.name] = f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
        else:
            raise ModelFileError(f"{source}: tensor {t.name} is not part of a llama model this converter knows")
    return plan


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of attn_q / attn_k ([2, d/2] -> [d/2, 2])."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(t) -> np.ndarray:
    """The tensor as float32 in numpy's order (GGUF lists dimensions fastest first)."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def convert_gguf(source: str | Path, dest: str | Path, dtype: str = "float32") -> dict:
    """Write the mlx-lm model folder for the GGUF file source into the existing folder dest; returns config."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    source, dest = Path(source), Path(dest)
    reader, meta = read_gguf(source)
    plan = _plan(reader, str(source))
    config = _config(meta, str(source), tied="output.weight" not in plan, dtype=dtype)
    files = tokenizer_files(meta, str(source), config["max_position_embeddings"])
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    weights = {}
    for t in reader.tensors:
        w = _dequantized(t)
        n_heads = heads.get(t.name.split(".", 2)[-1]) if t.name.startswith("blk.") else None
        if n_heads:
            w = unpermute_rope_rows(w, n_heads)
        weights[plan[t.name]] = mx.array(w).astype(getattr(mx, dtype))
    expected = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(weights) != expected:
        raise ModelFileError(
            f"{source}: {len(weights)} tensors where a {config['num_hidden_layers']}-layer llama model has {expected}"
        )
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    for name, text in files.items():
        (dest / name).write_text(text + "\n", encoding="utf-8")
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config
