"""The built-in random-weight models load in mlx-lm, chat, generate and stop, and build reproducibly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from kvstore.models import builtin as bm

TURN = {"llama": ("<|im_start|>", "<|im_end|>"), "gemma3": ("<start_of_turn>", "<end_of_turn>")}
MESSAGES = [
    {"role": "system", "content": "You are a careful reviewer."},
    {"role": "user", "content": "What should we do first?"},
]
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    bm.MARKER,
)


@pytest.fixture(scope="module", params=("llama", "gemma3"))
def built(request, tmp_path_factory):
    """(arch, path, model, tokenizer) of a freshly built tiny model."""
    path = bm.build_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param)
    model, tokenizer = mlx_lm.load(str(path))
    return request.param, path, model, tokenizer


def _files(path) -> dict:
    return {name: (path / name).read_bytes() for name in FILES}


def test_directory_and_config(built):
    arch, path, model, tokenizer = built
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {"llama": "llama", "gemma3": "gemma3_text"}[arch]
    assert config["kvstore_builtin"] == {
        "arch": arch,
        "size": "tiny",
        "seed": 0,
        "dtype": "float32",
        "overrides": {},
        "format": bm.BUILD_FORMAT,
    }
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (64, 4, 16)
    assert model.model.embed_tokens.weight.shape == (config["vocab_size"], 64)
    assert config["vocab_size"] == len(tokenizer.get_vocab())
    assert "random weights" in (path / bm.MARKER).read_text().lower()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_tokenizer_round_trip(built):
    arch, _, _, tokenizer = built
    text = "The agent said: fix the bug in 2 steps, then run 1024 tests! Café ✓ 日本\n\tdone."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(" the agent asked", add_special_tokens=False)) == 3  # common words are single tokens
    bos_first = tokenizer.encode(text)[0] == tokenizer.bos_token_id
    assert bos_first == (arch == "gemma3")  # Gemma prepends <bos>; the ChatML Llama does not


def test_chat_template(built):
    arch, _, _, tokenizer = built
    start, end = TURN[arch]
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    if arch == "llama":
        assert text == (
            "<|im_start|>system\nYou are a careful reviewer.<|im_end|>\n"
            "<|im_start|>user\nWhat should we do first?<|im_end|>\n<|im_start|>assistant\n"
        )
    else:  # Gemma has no system role: the system prompt opens the first user turn
        assert text == (
            "<bos><start_of_turn>user\nYou are a careful reviewer.\n\nWhat should we do first?"
            "<end_of_turn>\n<start_of_turn>model\n"
        )
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    start_id, end_id = tokenizer.convert_tokens_to_ids([start, end])
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(start_id) == {"llama": 3, "gemma3": 2}[arch]  # each turn marker is one token
    assert ids.count(end_id) == {"llama": 2, "gemma3": 1}[arch]
    assert tokenizer.eos_token == end
    assert end_id in tokenizer.eos_token_ids
    no_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt
    assert ids[len(no_prompt) :] == tokenizer.encode(
        start + {"llama": "assistant", "gemma3": "model"}[arch] + "\n", add_special_tokens=False
    )


def test_cache_kinds(built):
    arch, _, model, _ = built
    cache = model.make_cache()
    if arch == "llama":
        assert [type(c) for c in cache] == [KVCache] * 4
    else:
        assert [type(c) for c in cache] == [RotatingKVCache] * 3 + [KVCache]
        assert [c.max_size for c in cache[:3]] == [64] * 3
    model(mx.array([list(range(10, 110))]), cache=cache)  # 100 tokens: more than the window
    model(mx.array([[42]]), cache=cache)
    assert [c.offset for c in cache] == [101] * 4
    kept = [c.state[0].shape[2] for c in cache]
    if arch == "gemma3":
        assert kept[:3] == [64] * 3  # the sliding layers keep only the window
    assert min(kept[-1:] if arch == "gemma3" else kept) >= 101  # global layers keep every position


def test_greedy_generation(built):
    arch, _, model, tokenizer = built
    prompt = tokenizer.apply_chat_template(MESSAGES * 4, add_generation_prompt=True)  # longer than the window
    assert len(prompt) > 64
    first = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    again = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    assert 1 <= len(first) <= 8
    assert first == again  # greedy decoding of fixed weights is deterministic
    assert all(0 <= t < len(tokenizer.get_vocab()) for t in first)
    assert isinstance(mlx_lm.generate(model, tokenizer, "The agent", max_tokens=4), str)


def test_generation_stops_at_end_of_turn(built):
    arch, _, model, tokenizer = built
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    end_id = tokenizer.convert_tokens_to_ids(TURN[arch][1])

    def end_after_three(tokens, logits):
        """Force the end-of-turn token as the fourth generated token."""
        if tokens.size < len(prompt) + 3:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == end_id, 0.0, -1e9)[None]

    out = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=20, logits_processors=[end_after_three]))
    assert [r.finish_reason for r in out] == [None, None, None, "stop"]
    assert out[-1].token == end_id


@pytest.mark.parametrize("arch", bm.ARCHITECTURES)
def test_reproducible_builds(tmp_path, arch):
    a = _files(bm.build_model(tmp_path / "a", arch=arch, seed=7))
    b = _files(bm.build_model(tmp_path / "b", arch=arch, seed=7))
    c = _files(bm.build_model(tmp_path / "c", arch=arch, seed=8))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]  # the seed is for weights only


def test_tokenizer_training_is_deterministic_across_processes():
    # Loads the module file alone: importing the whole kvstore package would triple the time.
    code = (
        "import hashlib, importlib.util as u, sys; s = u.spec_from_file_location('bm', sys.argv[1]); "
        "bm = u.module_from_spec(s); s.loader.exec_module(bm); "
        "print(hashlib.sha256(bm._tokenizer_json('gemma3').encode()).hexdigest())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code, bm.__file__],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=str(i)),
        ).stdout.strip()
        for i in (1, 2)
    }
    assert runs == {hashlib.sha256(bm._tokenizer_json("gemma3").encode()).hexdigest()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(tmp_path, dtype):
    path = bm.build_model(tmp_path / "m", arch="gemma3", dtype=dtype)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
    model, _ = mlx_lm.load(str(path))
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    logits = model(mx.array([[5, 6, 7]]))
    assert logits.dtype == getattr(mx, dtype)
    assert mx.isfinite(logits).all().item()


def test_overrides(tmp_path):
    path = bm.build_model(tmp_path / "m", arch="gemma3", sliding_window=32, num_hidden_layers=8)
    model, _ = mlx_lm.load(str(path))
    cache = model.make_cache()
    assert [type(c) for c in cache] == ([RotatingKVCache] * 3 + [KVCache]) * 2
    assert cache[0].max_size == 32
    assert json.loads((path / "config.json").read_text())["kvstore_builtin"]["overrides"] == {
        "num_hidden_layers": 8,
        "sliding_window": 32,
    }
    with pytest.raises(ValueError, match="sliding_windw"):
        bm.build_model(tmp_path / "typo", arch="gemma3", sliding_windw=32)
    with pytest.raises(ValueError, match="arch"):
        bm.build_model(tmp_path / "bad", arch="gpt2")


def test_rebuild_over_existing_directory(tmp_path):
    path = bm.build_model(tmp_path / "m", seed=1)
    (path / "notes.txt").write_text("mine")
    assert bm.build_model(path, seed=2) == path
    assert _files(path) == _files(bm.build_model(tmp_path / "fresh", seed=2))
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "m"]


def test_builtin_model_path_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path))
    path = bm.builtin_model_path("gemma3")
    assert path == tmp_path / "gemma3-tiny-s0-float32"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert bm.builtin_model_path("gemma3") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    model, tokenizer = bm.load_builtin("gemma3")
    assert len(model.make_cache()) == 4
    config = json.loads((path / "config.json").read_text())
    config["kvstore_builtin"]["format"] = bm.BUILD_FORMAT - 1  # as written by an older kvstore
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"old")
    assert bm.builtin_model_path("gemma3") == path
    assert _files(path) == _files(bm.build_model(tmp_path / "fresh", arch="gemma3"))  # rebuilt in place
    assert bm.builtin_model_path("gemma3", root=tmp_path / "other").parent == tmp_path / "other"


def test_builtin_model_path_lost_race(tmp_path, monkeypatch):
    final = tmp_path / "llama-tiny-s3-float32"
    real_rename = os.rename

    def rival_wins(src, dst):
        """Another process finishes the same build just before our rename."""
        monkeypatch.setattr(os, "rename", real_rename)
        bm.build_model(final, seed=3)
        (final / "winner.txt").write_text("rival")
        real_rename(src, dst)  # fails: the directory is taken

    monkeypatch.setattr(os, "rename", rival_wins)
    assert bm.builtin_model_path(seed=3, root=tmp_path) == final
    assert (final / "winner.txt").read_text() == "rival"  # the winner's build is used as it is
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our temporary build is gone


NEW_FAMILIES = [a for a in bm.ARCHITECTURES if a not in ("llama", "gemma3")]


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_family_models_load_chat_and_use_their_cache_classes(tmp_path, arch):
    from kvstore.models.builtin_families import FAMILIES

    path = bm.build_model(tmp_path / "m", arch=arch)
    model, tokenizer = mlx_lm.load(str(path))
    config = json.loads((path / "config.json").read_text())
    assert config["kvstore_builtin"]["arch"] == arch
    cache = model.make_cache()
    assert {type(c).__name__ for c in cache} == set(FAMILIES[arch][1])
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # ChatML, one token per marker
    first = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=6)]
    assert first == [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=6)]
    assert 1 <= len(first) <= 6


def test_builtin_name_alone_resolves(tmp_path, monkeypatch):
    """Issue 25, defect 8: "builtin" (documented) raised ValueError in the Python API."""
    import kvstore
    from kvstore.agents import AgentManager, resolve_model

    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    handle = resolve_model("builtin")
    assert json.loads((handle.path / "config.json").read_text())["kvstore_builtin"]["arch"] == "llama"
    assert handle.path.name == "llama-tiny-s0-float32"
    with kvstore.open(tmp_path / "store") as store, AgentManager("builtin", store) as mgr:
        assert mgr.fingerprint == handle.fingerprint
        assert mgr.create("a", system_prompt="Be brief.").chat("hello", max_tokens=2).text is not None
    assert resolve_model("builtin:lfm2-tiny").path.name == "lfm2-tiny-s0-float32"
    with pytest.raises(kvstore.StoreError, match="unknown built-in model"):
        resolve_model("builtin:mamba9-tiny")
