"""The config.json of each built-in random-weight model family, one function per family.

Each family is a real mlx-lm architecture chosen for the cache classes it makes (see
docs/USAGE.md, "Cache families"): a table of functions from the generic size (`SIZES` in
kvstore.models.builtin) to the fields that family's `ModelArgs` reads. The build mechanics (weights,
tokenizer, files) live in kvstore.models.builtin.
"""

from __future__ import annotations

from collections.abc import Callable


def _llama(s: dict) -> dict:
    c = {k: v for k, v in s.items() if k != "sliding_window"}  # every layer attends to everything
    return dict(
        c,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
    )


def _gemma3(s: dict) -> dict:
    return dict(
        s,
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        sliding_window_pattern=4,
        query_pre_attn_scalar=s["head_dim"],
        hidden_activation="gelu_pytorch_tanh",
    )


def _qwen3_next(s: dict) -> dict:
    """Qwen3-Next: gated delta-net layers (ArraysCache) with a full-attention layer every 4th (KVCache)."""
    h = s["head_dim"]
    return dict(
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=h,
        intermediate_size=s["intermediate_size"],
        model_type="qwen3_next",
        architectures=["Qwen3NextForCausalLM"],
        linear_num_value_heads=s["num_attention_heads"],
        linear_num_key_heads=s["num_key_value_heads"],
        linear_key_head_dim=h,
        linear_value_head_dim=h,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=s["intermediate_size"],
        moe_intermediate_size=s["intermediate_size"] // 2,
        mlp_only_layers=[],
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        full_attention_interval=4,
    )


def _lfm2(s: dict) -> dict:
    """LFM2: short-convolution layers (ArraysCache) and attention layers (KVCache), 2 of each per 4."""
    n = s["num_hidden_layers"]
    return dict(
        hidden_size=s["hidden_size"],
        num_hidden_layers=n,
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        model_type="lfm2",
        architectures=["Lfm2ForCausalLM"],
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=s["hidden_size"],
        block_ff_dim=s["intermediate_size"],
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        rope_theta=1_000_000.0,
        layer_types=["full_attention" if i % 2 else "conv" for i in range(n)],
    )


def _nemotron_h(s: dict) -> dict:
    """Nemotron-H: Mamba-2 layers (ArraysCache), MLP layers (no cache) and one attention layer (KVCache)."""
    n = s["num_hidden_layers"]
    pattern = ["M", "-", "*", "-"] * (n // 4) + ["M"] * (n % 4)
    return dict(
        hidden_size=s["hidden_size"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        model_type="nemotron_h",
        architectures=["NemotronHForCausalLM"],
        attention_bias=False,
        mamba_num_heads=s["num_attention_heads"],
        mamba_head_dim=s["head_dim"],
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        hybrid_override_pattern=pattern,
    )


def _llama4(s: dict) -> dict:
    """Llama 4 text: chunked-attention layers (ChunkedKVCache) with a global layer every 4th (KVCache)."""
    text = dict(
        model_type="llama4_text",
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        intermediate_size_mlp=s["intermediate_size"],
        attention_bias=False,
        attention_chunk_size=s["sliding_window"],
        interleave_moe_layer_step=2,
        num_local_experts=4,
        num_experts_per_tok=1,
        rms_norm_eps=1e-5,
        rope_scaling=None,
        rope_theta=500_000.0,
        use_qk_norm=True,
        max_position_embeddings=32768,
    )
    return dict(model_type="llama4", architectures=["Llama4ForConditionalGeneration"], text_config=text)


def _gpt_oss(s: dict) -> dict:
    """gpt-oss: sliding-window layers (RotatingKVCache) alternating with full-attention ones (KVCache)."""
    n = s["num_hidden_layers"]
    return dict(
        hidden_size=s["hidden_size"],
        num_hidden_layers=n,
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        sliding_window=s["sliding_window"],
        rope_theta=150000,
        max_position_embeddings=131072,  # transformers' gpt-oss config expects 32 x its 4,096-token YaRN base
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
    )


# arch -> (config function, the mlx-lm cache classes its layers use: documentation and the family tests)
FAMILIES: dict[str, tuple[Callable[[dict], dict], tuple[str, ...]]] = {
    "llama": (_llama, ("KVCache",)),
    "gemma3": (_gemma3, ("RotatingKVCache", "KVCache")),
    "qwen3_next": (_qwen3_next, ("ArraysCache", "KVCache")),
    "lfm2": (_lfm2, ("ArraysCache", "KVCache")),
    "nemotron_h": (_nemotron_h, ("ArraysCache", "KVCache")),
    "llama4": (_llama4, ("ChunkedKVCache", "KVCache")),
    "gpt_oss": (_gpt_oss, ("RotatingKVCache", "KVCache")),
}


def family_config(arch: str, size: dict) -> dict:
    """The architecture fields of arch's config.json at a generic size (vocabulary and tokens apart)."""
    return FAMILIES[arch][0](dict(size))


def recurrent(arch: str) -> bool:
    """Whether arch's cache has recurrent-state layers (mlx-lm's ArraysCache)."""
    return "ArraysCache" in FAMILIES[arch][1]
