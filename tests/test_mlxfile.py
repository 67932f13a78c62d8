"""mlx-lm prompt-cache files through import-mlx and export-mlx (issue 25, items 1, 2, 5, 6 and 12).

Real files written by mlx-lm's own `save_prompt_cache` (or `mlx_lm.cache_prompt`) from the built-in
tiny Llama-style model (4 layers, 2 KV heads of 16), imported into a real store; hostile files are
those files with one array edited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

import kvstore
from kvstore.cli.main import cli
from kvstore.models.builtin import builtin_model_path, load_builtin

CHUNK = 16  # the stores' chunk size: the 32-token prompts below are two whole chunks


@pytest.fixture(scope="module")
def model():
    return load_builtin()[0]


@pytest.fixture(scope="module")
def fp():
    return kvstore.fingerprint(builtin_model_path())


def run(args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


def ids(seed: int, n: int = 32) -> list[int]:
    """n token ids, different for each seed (the built-in vocabulary has 1,024)."""
    return [(seed * 131 + i * 37) % 1000 + 10 for i in range(n)]


def prefill(model, tokens: list[int]) -> list:
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def mlx_file(path: Path, model, tokens: list[int]) -> Path:
    """What mlx-lm writes for a cache of `tokens` (mlx_lm.cache_prompt's metadata)."""
    save_prompt_cache(str(path), prefill(model, tokens), {"model": "builtin", "tokenizer_config": "{}"})
    return path


def edit(path: Path, change) -> Path:
    """Rewrite the file with change(arrays) applied (its metadata kept)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    change(arrays)
    mx.save_safetensors(str(path), arrays, meta)
    return path


@pytest.fixture
def store_dir(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK):
        pass
    return tmp_path / "s"


def import_args(file, agent, store_dir, tokens):
    return [
        "import-mlx",
        file,
        agent,
        "--model",
        "builtin",
        "--tokens",
        ",".join(map(str, tokens)),
        "--store",
        store_dir,
    ]


# -- item 1: a file's token ids are a claim, not a proof ---------------------------------------------


def test_a_file_imported_under_other_token_ids_stays_private_to_its_agent(tmp_path, store_dir, model, fp):
    a, b = ids(1), ids(2)
    file = mlx_file(tmp_path / "a.safetensors", model, a)
    out = run(import_args(file, "imp", store_dir, b)).stdout
    true_b = prefill(model, b)
    with kvstore.open(store_dir) as s:
        # No other agent meets the file's KV under b's ids ...
        assert s.match(b, model=fp).n_tokens == 0
        assert s.restore(b + [5, 6, 7], model=fp) == (None, 0)
        # ... and an agent that saves a true b-prefixed cache keeps its own KV (no dedup against the file's).
        s.save("real", true_b, b, model=fp)
        real, _ = s.load("real", model=fp)
        assert all(mx.array_equal(x.keys, y.keys[..., :32, :]) for x, y in zip(real, true_b))
        restored, n = s.restore(b + [5], model=fp)
        assert n == 32 and all(mx.array_equal(x.keys, y.keys[..., :32, :]) for x, y in zip(restored, true_b))
        # The importing agent itself loads what it imported, and continues kept apart.
        mine, seen = s.load("imp", model=fp)
        assert seen == b and all(mx.array_equal(x.keys, y.keys[..., :32, :]) for x, y in zip(mine, prefill(model, a)))
        longer = prefill(model, b + ids(3, 16))
        s.save("imp", longer, b + ids(3, 16), model=fp)
        assert s.match(b + ids(3, 16), model=fp).n_tokens == 32  # the real agent's b, not imp's longer head
        assert s.agent("imp").model == fp
        assert s.fsck().ok
    assert "not verified: kept private to imp" in out


def test_verify_refuses_a_file_of_other_token_ids_and_shares_a_true_one(tmp_path, store_dir, model, fp):
    a, b = ids(1), ids(2)
    file = mlx_file(tmp_path / "a.safetensors", model, a)
    err = run([*import_args(file, "imp", store_dir, b), "--verify"], code=1).stderr
    assert f"{file} layer 0: its keys are not what the model computes from the given token ids" in err
    with kvstore.open(store_dir) as s:
        assert s.agents() == []
    out = run([*import_args(file, "imp", store_dir, a), "--verify"]).stdout
    assert "verified: the model's own prefill of the token ids matches it" in out
    assert "tolerance 0.02" in out
    with kvstore.open(store_dir) as s:
        restored, n = s.restore(a + [5, 6], model=fp)
        assert n == 32
        assert all(mx.array_equal(x.keys, y.keys[..., :32, :]) for x, y in zip(restored, prefill(model, a)))
        assert s.fsck().ok


def test_the_python_api_says_which_import_happened(tmp_path, store_dir, model, fp):
    a = ids(4)
    file = mlx_file(tmp_path / "a.safetensors", model, a)
    with kvstore.open(store_dir) as s:
        with pytest.raises(TypeError, match="needs the model itself"):
            kvstore.import_mlx_cache(s, file, "x", model=fp, tokens=a)
        private = kvstore.import_mlx_cache(s, file, "x", model=builtin_model_path(), tokens=a)
        assert (private.verified, private.error, private.snapshot.n_tokens) == (False, None, 32)
        assert s.match(a, model=fp).n_tokens == 0
        with pytest.raises(kvstore.AgentExistsError):
            kvstore.import_mlx_cache(s, file, "x", model=builtin_model_path(), tokens=a, verify=True)
        shared = kvstore.import_mlx_cache(s, file, "y", model=(model, None), tokens=a, verify=True)
        assert shared.verified and shared.error <= shared.tolerance
        # A loaded model fingerprints differently from its folder: the match is under the model's own.
        assert s.match(a, model=kvstore.fingerprint(model)).n_tokens == 32
        assert s.fsck().ok


def test_a_kvstore_file_of_another_model_is_refused(tmp_path, store_dir, model, fp):
    a = ids(5)
    with kvstore.open(store_dir) as s:
        s.save("doc", prefill(model, a), a, model=fp)
    out = tmp_path / "doc.safetensors"
    run(["export-mlx", "doc", out, "--store", store_dir])
    arrays, meta = mx.load(str(out), return_metadata=True)
    mx.save_safetensors(str(out), arrays, {**meta, "0.kvstore_model": "0" * 32})
    err = run(["import-mlx", out, "doc-2", "--model", "builtin", "--store", store_dir], code=1).stderr
    assert "0" * 32 in err and "not of the model given" in err


# -- items 2, 5 and 12: files the model could not have written ---------------------------------------


def _set_nan(arrays):
    k = arrays["1.0"]
    arrays["1.0"] = mx.where(mx.arange(k.size).reshape(k.shape) == 5, mx.nan, k)


def _half(arrays):
    arrays["2.0"] = arrays["2.0"].astype(mx.float16)


def _more_heads(arrays):
    arrays["0.0"] = mx.concatenate([arrays["0.0"], arrays["0.0"]], axis=1)
    arrays["0.1"] = mx.concatenate([arrays["0.1"], arrays["0.1"]], axis=1)


def _wider_values(arrays):
    v = arrays["3.1"]
    arrays["3.1"] = mx.concatenate([v, v], axis=3)


def _infinite_values(arrays):
    arrays["2.1"] = arrays["2.1"] * mx.inf


def _offset_pair(arrays):
    arrays["1.2"] = mx.array([32, 32])


def _offset_float(arrays):
    arrays["1.2"] = mx.array(31.5)


@pytest.mark.parametrize(
    "change, says",
    [
        (_set_nan, "layer 1: its keys hold values that are not finite"),
        (_infinite_values, "layer 2: its values hold values that are not finite"),
        (_half, "layer 2: its keys are float16, the model computes float32"),
        (_more_heads, "layer 0: its keys have 4 heads, the model has 2"),
        (_wider_values, "layer 3: its values heads are 32 wide, the model's are 16"),
        (_offset_pair, "layer 1: its offset is an array of int32 of shape (2,), not one whole number"),
        (_offset_float, "layer 1: its offset is an array of float32 of shape (), not one whole number"),
    ],
    ids=["nan", "infinity", "float16-keys", "head-count", "head-size", "offset-pair", "offset-float"],
)
def test_a_file_the_model_could_not_have_written_is_refused(tmp_path, store_dir, model, change, says):
    a = ids(6)
    file = edit(mlx_file(tmp_path / "a.safetensors", model, a), change)
    err = run(import_args(file, "imp", store_dir, a), code=1).stderr
    assert f"{file} {says}" in err
    assert err.count("\n") == 1  # one line, no traceback
    with kvstore.open(store_dir) as s:
        assert s.agents() == []


def test_a_file_of_fewer_layers_is_refused(tmp_path, store_dir, model):
    a = ids(7)
    file = mlx_file(tmp_path / "a.safetensors", model, a)
    arrays, meta = mx.load(str(file), return_metadata=True)
    mx.save_safetensors(
        str(file),
        {k: v for k, v in arrays.items() if not k.startswith("3.")},
        {k: v for k, v in meta.items() if k != "1.3"},
    )
    err = run(import_args(file, "imp", store_dir, a), code=1).stderr
    assert f"{file} holds 3 layers, the model has 4" in err


# -- item 6: files mlx-lm itself reads and writes -----------------------------------------------------


def _mlx_lm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True, text=True, timeout=300, env=env)


def test_an_exported_file_runs_in_mlx_lm_generate(tmp_path, store_dir, model, fp):
    _model, tokenizer = load_builtin()
    prompt = tokenizer.encode("A shared document about refunds and ledgers.")
    with kvstore.open(store_dir) as s:
        s.save("doc", prefill(model, prompt), prompt, model=fp)
    out = tmp_path / "doc.safetensors"
    said = run(["export-mlx", "doc", out, "--model", "builtin", "--store", store_dir]).stdout
    assert f"--model {builtin_model_path()} --prompt-cache-file {out}" in said
    got = _mlx_lm(
        "generate",
        "--model",
        str(builtin_model_path()),
        "--prompt-cache-file",
        str(out),
        "--prompt",
        "What is refunded?",
        "--max-tokens",
        "3",
    )
    assert got.returncode == 0, got.stderr
    assert "Generation: 3 tokens" in got.stdout


def test_a_cache_prompt_file_imports_and_verifies(tmp_path, store_dir, fp):
    _model, tokenizer = load_builtin()
    text = "A shared document about refunds and ledgers, cached by mlx-lm."
    file = tmp_path / "prompt.safetensors"
    got = _mlx_lm(
        "cache_prompt", "--model", str(builtin_model_path()), "--prompt", text, "--prompt-cache-file", str(file)
    )
    assert got.returncode == 0, got.stderr
    # mlx_lm.cache_prompt's own tokens: the chat template with the message left open.
    ids_ = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=False, continue_final_message=True
    )
    (tmp_path / "ids.json").write_text(json.dumps(ids_))
    out = run(
        [
            "import-mlx",
            file,
            "doc",
            "--model",
            "builtin",
            "--tokens",
            tmp_path / "ids.json",
            "--verify",
            "--store",
            store_dir,
        ]
    ).stdout
    assert f"imported {file} as doc: {len(ids_)} tokens" in out and "verified:" in out
    with kvstore.open(store_dir) as s:
        assert s.match(ids_, model=fp).n_tokens == len(ids_)
        assert s.agent("doc").meta["mlx_lm_metadata"] == {"model": str(builtin_model_path())}
        assert s.fsck().ok


def test_fsck_and_gc_keep_a_private_import(tmp_path, store_dir, model, fp):
    a = ids(8)
    run(import_args(mlx_file(tmp_path / "a.safetensors", model, a), "imp", store_dir, a))
    with kvstore.open(store_dir) as s:
        s.gc(grace=0)
        cache, seen = s.load("imp", model=fp)
        assert seen == a and cache[0].offset == 32
        assert s.fsck().ok
        with pytest.raises(kvstore.TokenMismatchError, match="holds a cache of 32 tokens, but 31"):
            kvstore.import_mlx_cache(s, tmp_path / "a.safetensors", "z", model=builtin_model_path(), tokens=a[:-1])


def test_a_bfloat16_file_imports_and_verifies(tmp_path, store_dir):
    """Most mlx-lm models compute in bfloat16 (safetensors' numpy reader has no such dtype)."""
    folder = builtin_model_path(dtype="bfloat16")
    model = load_builtin(dtype="bfloat16")[0]
    a = ids(9)
    file = mlx_file(tmp_path / "bf16.safetensors", model, a)
    with kvstore.open(store_dir) as s:
        got = kvstore.import_mlx_cache(s, file, "bf", model=folder, tokens=a, verify=True)
        assert got.verified and got.error <= got.tolerance
        loaded, _ = s.load("bf", model=folder)
        assert loaded[0].keys.dtype == mx.bfloat16
        assert all(mx.array_equal(x.keys, y.keys[..., :32, :]) for x, y in zip(loaded, prefill(model, a)))
        with pytest.raises(kvstore.TokenMismatchError, match="layer 0: its keys are not what the model computes"):
            kvstore.import_mlx_cache(s, file, "bf-2", model=folder, tokens=ids(10), verify=True)
