"""The fingerprint memo on a loaded model notices replaced weights (issue 15, item 2).

`kvstore.fingerprint(model)` remembers its hash on the model object; after `load_weights`, an
optimizer step or a fused adapter the memo must not hand out the old weights' fingerprint, or
`restore` returns KV that the new weights never computed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore.models.builtin import build_model


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp-models")
    return [build_model(root / f"llama-s{seed}", arch="llama", seed=seed) for seed in (0, 1)]


def load(path):
    import mlx_lm

    return mlx_lm.load(str(path))[0]


def test_load_weights_changes_the_fingerprint(paths):
    model = load(paths[0])
    before = kvstore.fingerprint(model)
    assert kvstore.fingerprint(model) == before  # the memo: same weights, same answer
    model.load_weights(str(paths[1] / "model.safetensors"))
    after = kvstore.fingerprint(model)
    assert after != before
    assert after == kvstore.fingerprint(load(paths[1]))  # exactly what a fresh load of those weights gives


def test_an_optimizer_step_changes_the_fingerprint(paths):
    model = load(paths[0])
    before = kvstore.fingerprint(model)
    tokens = mx.array([[1, 5, 9, 14, 3]])

    def loss(m):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    optim.SGD(learning_rate=1e-2).update(model, grads)
    mx.eval(model.parameters())
    assert kvstore.fingerprint(model) != before


def test_fused_adapter_changes_the_fingerprint_and_an_unchanged_update_does_not(paths):
    model = load(paths[0])
    before = kvstore.fingerprint(model)
    same = tree_map(lambda a: mx.array(a), model.parameters())  # new arrays, the same values
    model.update(same)
    assert kvstore.fingerprint(model) == before
    # Fusing a LoRA adapter adds scale * B @ A to a projection: new arrays, every value moved.
    proj = model.model.layers[0].self_attn.q_proj
    a = mx.random.normal((proj.weight.shape[1], 4), key=mx.random.key(1)) * 0.01
    b = mx.random.normal((4, proj.weight.shape[0]), key=mx.random.key(2)) * 0.01
    proj.update({"weight": proj.weight + (a @ b).T.astype(proj.weight.dtype)})
    assert kvstore.fingerprint(model) != before


def test_restore_with_a_reloaded_model_never_returns_the_old_weights_kv(paths, tmp_path):
    model = load(paths[0])
    tokens = list(range(1, 40))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("a", cache, tokens, model=model)
        assert store.restore(tokens, model=model)[1] == len(tokens)
        model.load_weights(str(paths[1] / "model.safetensors"))
        restored, n = store.restore(tokens, model=model)
        assert (restored, n) == (None, 0)
        with pytest.raises(kvstore.ModelMismatchError):
            store.load("a", model=model)
        assert store.fsck().ok
