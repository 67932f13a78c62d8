"""Tiny seeded random-weight hybrid and recurrent mlx-lm models, built in memory from mlx-lm's own modules.

Each is `mlx_lm.models.<family>.Model(ModelArgs(...))` with seeded weights and the ChatML tokenizer of
the built-in Llama (`kvstore.models.builtin`, whose end-of-turn token `<|im_end|>` is its eos), as the
`(model, tokenizer)` pair `AgentManager` accepts. The same family and seed give the same weights, and so
the same fingerprint, in any process: a "restart" builds the model again.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

VOCAB = 1024  # >= the built-in tokenizer's vocabulary

CONFIGS = {
    # Gated delta-net (ArraysCache: conv state + recurrent state) every layer but each 4th (KVCache).
    "qwen3_next": dict(
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[],
        moe_intermediate_size=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        full_attention_interval=4,
    ),
    # Qwen3.5's text model: gated delta-net and attention, dense MLP (mlx-lm's qwen3_5 wraps it).
    "qwen3_5": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        full_attention_interval=4,
        rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    # Mamba-2 mixers, attention and MLP blocks in the pattern M*M- (ArraysCache, KVCache).
    "nemotron_h": dict(
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=4096,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=False,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        hybrid_override_pattern=["M", "*", "M", "-"],
        time_step_limit=(0.0, float("inf")),
    ),
    # Every layer a Mamba-2 mixer beside attention: CacheList(ArraysCache, KVCache) per layer.
    "falcon_h1": dict(
        hidden_size=64,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_conv=4,
        mamba_d_head=16,
        mamba_d_ssm=64,
        mamba_d_state=16,
        mamba_n_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    # Short convolutions (ArraysCache of one conv state) with attention at layers 1 and 3.
    "lfm2": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=64,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        block_ff_dim=128,
        full_attn_idxs=[1, 3],
    ),
    # Pure state-space model: no attention layer, no positional cache at all.
    "mamba2": dict(
        num_heads=4,
        head_dim=16,
        hidden_size=32,
        intermediate_size=64,
        state_size=16,
        num_hidden_layers=3,
        layer_norm_epsilon=1e-5,
        conv_kernel=4,
        n_groups=1,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        time_step_limit=(0.0, float("inf")),
        time_step_rank=8,
    ),
    # Two more pure recurrent models (tests of a turn's length only).
    "mamba": dict(
        hidden_size=32,
        intermediate_size=64,
        state_size=16,
        num_hidden_layers=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=8,
    ),
    "rwkv7": dict(
        hidden_size=64,
        intermediate_size=128,
        norm_eps=1e-5,
        head_dim=16,
        num_hidden_layers=2,
        a_low_rank_dim=8,
        v_low_rank_dim=8,
        gate_low_rank_dim=8,
        decay_low_rank_dim=8,
    ),
}
RECURRENT = ("mamba", "mamba2", "rwkv7")  # no attention layer at all
FAMILIES = tuple(f for f in CONFIGS if f not in ("mamba", "rwkv7"))  # the full matrix


@cache
def tokenizer():
    """The built-in Llama's tokenizer (ChatML template, eos `<|im_end|>`), loaded once."""
    from mlx_lm.utils import load_tokenizer

    from kvstore.models.builtin import builtin_model_path

    return load_tokenizer(builtin_model_path("llama", "tiny"))


def build(family: str, seed: int = 0):
    """(model, tokenizer): a seeded random-weight `family` model from mlx-lm's own module."""
    module = importlib.import_module(f"mlx_lm.models.{family}")
    args = module.ModelArgs.from_dict(dict(CONFIGS[family], model_type=family, vocab_size=VOCAB))
    mx.random.seed(seed)  # some modules draw 1-d parameters (decay rates) at construction
    model = module.Model(args)
    rng = np.random.default_rng(seed)
    params = []
    for name, p in sorted(tree_flatten(model.parameters())):
        if p.ndim >= 2:  # norm scales, biases and decay rates keep the module's own initial values
            p = mx.array(rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.05))
        params.append((name, p))
    model.update(tree_unflatten(params))
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer()


def write_model(family: str, path: Path, seed: int = 0) -> Path:
    """`build(family, seed)` as an mlx-lm model folder (config, weights, the built-in tokenizer's files),
    for what takes a path: `kvstore serve --model PATH`."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from kvstore.models.builtin import builtin_model_path

    model, _tokenizer = build(family, seed)
    path.mkdir(parents=True, exist_ok=True)
    src = builtin_model_path("llama", "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
    eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    config = dict(CONFIGS[family], model_type=family, vocab_size=VOCAB, eos_token_id=eos)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
