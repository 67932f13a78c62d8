"""The tokenizer files of an mlx-lm model folder, rebuilt from a GGUF file's tokenizer metadata.

GGUF keeps a byte-level BPE ("gpt2" model) as its token strings, merges and token types; the
pre-tokenizer is named, not described (``tokenizer.ggml.pre``), so the few we know are spelt out here.
"""

from __future__ import annotations

import json

# llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
CONTROL, USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> split digits one by one before the byte-level split (SmolLM's tokenizer.json does)
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


def tokenizer_json(meta: dict, source: str) -> str:
    """tokenizer.json text for the GGUF tokenizer metadata in meta (field name -> value)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from .errors import ModelFileError

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ModelFileError(f"{source}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ModelFileError(
            f"{source}: pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.token_type" not in meta:
        raise ModelFileError(f"{source}: no tokenizer vocabulary in its metadata")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if PRE_TOKENIZERS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    return tok.to_str(pretty=True)


def _token(meta: dict, key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else meta["tokenizer.ggml.tokens"][int(i)]


def eos_token(meta: dict) -> str | None:
    """The end-of-turn token: for a ChatML template that is <|im_end|>, whatever the file calls its eos."""
    template = meta.get("tokenizer.chat_template") or ""
    if "<|im_end|>" in template and "<|im_end|>" in meta["tokenizer.ggml.tokens"]:
        return "<|im_end|>"
    return _token(meta, "eos")


def tokenizer_files(meta: dict, source: str, max_length: int) -> dict[str, str]:
    """{file name: text} for tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = {
        k: v
        for k, v in (
            ("bos_token", _token(meta, "bos")),
            ("eos_token", eos_token(meta)),
            ("unk_token", _token(meta, "unknown")),
            ("pad_token", _token(meta, "padding")),
        )
        if v is not None
    }
    added = {
        str(i): dict(content=tokens[i], lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, t in enumerate(types)
        if t in (CONTROL, USER_DEFINED)
    }
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        **special,
        added_tokens_decoder=added,
        additional_special_tokens=[tokens[int(i)] for i in added if tokens[int(i)] not in special.values()],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=False,
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer_json(meta, source),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
