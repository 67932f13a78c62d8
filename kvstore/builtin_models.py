"""Built-in offline models: real mlx-lm architectures with seeded random weights and a real tokenizer.

No model can be downloaded here (tests, the demo and CI run offline), so kvstore writes its own:
`config.json`, `model.safetensors` and tokenizer files that `mlx_lm.load(path)` loads like any
model from a hub. The weights are random, so generated text is gibberish; the KV caches, chat
templates and sliding windows are exactly those of the real architectures.

    python -m kvstore.builtin_models PATH --arch gemma3 --size tiny
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

ARCHITECTURES = ("llama", "gemma3")
SIZES = {  # hidden, layers, heads, kv heads, head dim, intermediate
    "tiny": (64, 4, 4, 2, 16, 128),
    "small": (256, 8, 4, 2, 64, 512),
    "base": (512, 12, 8, 4, 64, 1536),
}
VOCAB_SIZE = 1024
SPECIAL = {
    "llama": ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
    "gemma3": ["<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"],
}
CHAT_TEMPLATES = {
    # ChatML, as Qwen and many Llama fine-tunes use.
    "llama": (
        "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Gemma's: no system role, the system prompt is folded into the first user turn.
    "gemma3": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% set ns.system = message['content'] + '\n\n' %}{% else %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n{% if loop.index0 == 1 or (loop.first and message['role'] != 'system') %}"
        "{{ ns.system }}{% endif %}{{ message['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}
# A few KB of plain English so common words become single tokens.
_CORPUS = """
The team met on Monday to review the payment service. A critical bug in the API was returning errors
for some card payments, and the business analyst wanted to know the impact on revenue and customers.
The technical specialist traced the failure to a timeout in the database connection pool. The fix was
to raise the pool size, add a retry with backoff, and write a test that fails without the change.
The coordinator asked each agent for a short answer, then wrote a summary with the next steps.
Agents share a long system prompt, so the store keeps that prefix once and every agent starts warm.
A cache of keys and values for every layer is saved in chunks of tokens, named by a hash of the
tokens before them. When the process restarts, the agent loads its cache from disk in milliseconds
instead of reading the whole prompt again. The model, the tokenizer and the chat template decide
the tokens; the store checks the model's fingerprint so a cache is never used with the wrong model.
Please explain the steps, the risks, and the cost. What should we do first? Thank you for the help.
We have a critical API bug affecting payment processing. Analyze technical issues and business impact.
What are the detailed steps to fix that API bug? Customers, orders, invoices, refunds, latency, logs.
""" * 4


def default_root() -> Path:
    return Path(os.environ.get("KVSTORE_MODELS") or Path.home() / ".cache" / "kvstore" / "models")


def _config(arch: str, size: str, vocab: int, dtype: str, specials: dict, overrides: dict) -> dict:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    hidden, layers, heads, kv_heads, head_dim, inter = SIZES[size]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inter, vocab_size=vocab,
                  max_position_embeddings=8192, torch_dtype=dtype,
                  bos_token_id=specials["bos"], eos_token_id=specials["eos"], pad_token_id=specials["pad"])
    if arch == "llama":
        cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=True, **common)
    else:
        cfg = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], rms_norm_eps=1e-6,
                   rope_theta=1_000_000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=head_dim,
                   sliding_window=64, sliding_window_pattern=4, **common)
    cfg.update(overrides)
    return cfg


def _tokenizer(arch: str, out: Path) -> dict:
    """Train a byte-level BPE on the built-in corpus; write tokenizer files; return special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIAL[arch]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.split("\n"), trainer)
    tok.save(str(out / "tokenizer.json"))
    bos, start, end, pad = specials
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": end, "pad_token": pad,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "chat_template": CHAT_TEMPLATES[arch],
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                                           "rstrip": False, "normalized": False,
                                                           "single_word": False} for t in specials},
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": end,
                                                              "pad_token": pad}, indent=2))
    return {"bos": tok.token_to_id(bos), "eos": tok.token_to_id(end), "pad": tok.token_to_id(pad),
            "vocab": tok.get_vocab_size()}


def _weights(cfg: dict, seed: int, dtype: str) -> dict[str, mx.array]:
    """Seeded random parameters under the names mlx_lm.load expects."""
    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
            data = np.ones(value.shape, dtype=np.float32) if cfg["model_type"] == "llama" else \
                np.zeros(value.shape, dtype=np.float32)  # Gemma's RMSNorm scales by (1 + weight)
        else:
            data = rng.standard_normal(value.shape, dtype=np.float32) * 0.05
        out[name] = mx.array(data).astype(getattr(mx, dtype))
    return out


def build_model(path, arch: str = "llama", size: str = "tiny", seed: int = 0, dtype: str = "float32",
                **overrides) -> Path:
    """Write the model directory at path (built aside, then renamed into place) and return it."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
    try:
        specials = _tokenizer(arch, work)
        cfg = _config(arch, size, specials["vocab"], dtype, specials, overrides)
        cfg["kvstore_builtin"] = {"arch": arch, "size": size, "seed": seed, "dtype": dtype, **overrides}
        (work / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        mx.save_safetensors(str(work / "model.safetensors"), _weights(cfg, seed, dtype), {"format": "mlx"})
        (work / "KVSTORE_BUILTIN.txt").write_text(
            "Random weights, generated by kvstore for tests and demos: the text it writes is gibberish.\n"
            f"arch={arch} size={size} seed={seed} dtype={dtype} overrides={overrides}\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


def builtin_model_path(arch: str = "llama", size: str = "tiny", seed: int = 0, dtype: str = "float32",
                       root=None) -> Path:
    """The cached build's folder under root (default $KVSTORE_MODELS or ~/.cache/kvstore/models), built if missing."""
    root = Path(root) if root is not None else default_root()
    path = root / f"{arch}-{size}-s{seed}-{dtype}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
    try:
        build_model(staging / "model", arch, size, seed, dtype)
        try:
            os.rename(staging / "model", path)  # atomic; fails if another process won the race
        except OSError:
            if not (path / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_builtin(arch: str = "llama", size: str = "tiny", seed: int = 0, dtype: str = "float32", root=None):
    """(model, tokenizer) of a built-in model, loaded through mlx_lm.load."""
    from mlx_lm import load

    return load(str(builtin_model_path(arch, size, seed, dtype, root)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a built-in offline model (random weights) for mlx-lm.")
    ap.add_argument("path")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    print(build_model(args.path, args.arch, args.size, args.seed, args.dtype))


if __name__ == "__main__":
    main()
