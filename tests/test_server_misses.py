"""Every miss explained (issue 27, point 3): each reason code produced through the openai SDK against a real
`kvstore serve`, and `kvstore explain` reading the same explanation back from the stored conversation."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import TEST_CHUNK
from server_process import ServerProcess, new_store, tiny_model

import kvstore
from kvstore.agents.turn import common_prefix, render
from kvstore.cli.main import cli
from kvstore.server.miss import classify
from kvstore.server.reasons import REASONS

openai = pytest.importorskip("openai")

SYSTEM_A = "You are the archivist of a small town library. " * 3
SYSTEM_Z = "Unrelated instructions for another client entirely. " * 3
SYSTEM_C = "Zany zebras zigzag; quiet quokkas queue. " * 3
SYS_A = {"role": "system", "content": SYSTEM_A}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


def miss_of(r) -> dict:
    return r.usage.model_extra["kvstore"]["miss"]


def send(client, model: str, msgs: list[dict], max_tokens: int = 6):
    return client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens)


def diverging_users(model: str) -> tuple[str, str, int]:
    """Two user messages after SYSTEM_A whose prompts part inside a chunk (not on a chunk boundary)."""
    from mlx_lm import load

    from kvstore.agents.turn import render

    tok = load(model)[1]  # the tokenizer the server renders with

    def prompt(user: str) -> list[int]:
        return render(tok, [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": user}])

    base = "Where are the maps of the old harbour kept"
    for pad in range(12):
        a, b = base + " please" * pad + "?", base + " please" * pad + ", and who drew them?"
        pa, pb = prompt(a), prompt(b)
        d = next(i for i, (x, y) in enumerate(zip(pa, pb)) if x != y)
        if d % TEST_CHUNK not in (0, TEST_CHUNK - 1):
            return a, b, d
    raise AssertionError("no pair of messages parts inside a chunk")


def test_the_reason_codes_of_one_model(tmp_path, model_path):
    """new_content, none, chunk_granularity and evicted (deleted behind the server's back), in one server."""
    user_a, user_b, parted = diverging_users(model_path)
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-resident", "1", "--max-disk", "none")
    srv.start()
    try:
        client = srv.openai()
        first = [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": user_a}]
        r = send(client, model_path, first)
        miss = miss_of(r)
        assert miss["reason"] == "new_content" and miss["position"] == 0 and miss["segment"] == "system"
        assert miss["uncached_tokens"] == r.usage.prompt_tokens
        assert miss["context"].startswith("⟦") and "You are the" in miss["context"]
        conv_a = r.usage.model_extra["kvstore"]["conversation"]

        again = send(client, model_path, first)  # the same prompt: all but its last token from memory
        assert miss_of(again) == {"uncached_tokens": 1, "reason": "none", "position": None}

        followed = [*first, {"role": "assistant", "content": again.choices[0].message.content}]
        followed.append({"role": "user", "content": "Thank you. And the census records?"})
        r2 = send(client, model_path, followed)
        miss = miss_of(r2)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert miss["reason"] == "new_content" and miss["position"] == cached > 0
        assert miss["segment"] == "messages[2]"  # the reply's closing tokens, which the generation never made
        assert miss["uncached_tokens"] == r2.usage.prompt_tokens - cached

        send(client, model_path, [{"role": "system", "content": SYSTEM_Z}, {"role": "user", "content": "Hi."}])
        # A is out of memory now (--max-resident 1): B, which shares its start, restores whole chunks of it.
        other = [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": user_b}]
        r3 = send(client, model_path, other)
        miss = miss_of(r3)
        ext = r3.usage.model_extra["kvstore"]
        assert miss["reason"] == "chunk_granularity"
        assert miss["position"] == parted and miss["stored_in"] == conv_a
        assert ext["cached_disk_tokens"] == parted // TEST_CHUNK * TEST_CHUNK < parted
        assert miss["segment"] == "messages[1]" and miss["stored_context"]

        alone = [{"role": "system", "content": SYSTEM_C}, {"role": "user", "content": "Any news?"}]
        r4 = send(client, model_path, alone)
        conv_c = r4.usage.model_extra["kvstore"]["conversation"]
        with kvstore.open(srv.store) as store:  # `kvstore rm` while the server runs
            assert store.delete(conv_c)
        send(client, model_path, [{"role": "system", "content": SYSTEM_Z}, {"role": "user", "content": "Hey."}])
        alone += [{"role": "assistant", "content": r4.choices[0].message.content}, {"role": "user", "content": "Ok."}]
        miss = miss_of(send(client, model_path, alone))
        assert miss["reason"] == "evicted" and miss["evicted_by"] == "deleted" and miss["conversation_was"] == conv_c
        assert miss["position"] == r4.usage.prompt_tokens  # the deleted conversation's last prompt went this far
    finally:
        assert srv.stop() == 0
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
    name = r3.usage.model_extra["kvstore"]["conversation"]
    out = CliRunner().invoke(cli, ["--store", str(srv.store), "explain", name, "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == dict(miss_of(r3), turn=1, conversation=name)
    text = CliRunner().invoke(cli, ["--store", str(srv.store), "explain", name, "--turn", "1"]).output
    assert "chunk_granularity" in text and f"token {parted}" in text and REASONS["chunk_granularity"][:40] in text
    missing = CliRunner().invoke(cli, ["--store", str(srv.store), "explain", name, "--turn", "7"])
    assert missing.exit_code == 1 and "no recorded turn 7" in missing.output


def test_another_model_and_a_changed_template(tmp_path, model_path, tmp_path_factory):
    """other_model: the same prompt on other weights; template_changed: the same messages, another template."""
    store = new_store(tmp_path / "store")
    srv = ServerProcess(model_path, store, "--max-disk", "none").start()
    try:
        msgs = [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": "Open at nine?"}]
        r = send(srv.openai(), model_path, msgs)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        msgs.append({"role": "user", "content": "And on Sundays?"})
    finally:
        assert srv.stop() == 0

    from kvstore.models.builtin import builtin_model_path

    other = str(builtin_model_path(seed=1, root=tmp_path_factory.mktemp("models-seed1")))
    srv = ServerProcess(other, store, "--max-disk", "none").start()
    try:
        r = send(srv.openai(), other, msgs[:2])
        miss = miss_of(r)
        assert miss["reason"] == "other_model" and miss["other_model"] == "llama-tiny-s0-float32"
        assert miss["position"] > TEST_CHUNK and r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        assert srv.stop() == 0

    retemplated = tmp_path / "retemplated"  # the same weights (the same fingerprint), another chat template
    shutil.copytree(model_path, retemplated)
    config = json.loads((retemplated / "tokenizer_config.json").read_text())
    changed = config["chat_template"].replace("'\\n' + message['content']", "':\\n' + message['content']")
    assert changed != config["chat_template"]
    (retemplated / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=changed)))
    srv = ServerProcess(str(retemplated), store, "--max-disk", "none").start()
    try:
        r = send(srv.openai(), str(retemplated), msgs)
        miss = miss_of(r)
        assert miss["reason"] == "template_changed"
        assert miss["segment"] == "system" and miss["position"] < TEST_CHUNK
        assert miss["context"].split("⟦")[1].startswith(":")  # the template's new colon, right at the position
    finally:
        assert srv.stop() == 0
    with kvstore.open(store) as st:
        assert st.fsck().ok


def test_a_prefix_beyond_the_restorable_one_is_named_by_the_models_kind():
    """The reasons for a stored prefix that goes further than the restore: a hybrid model's checkpoints, the
    store's chunks, or neither."""
    kw = dict(limit=100, chunk_size=16)
    assert classify(cached=16, known=40, recurrent=True, **kw) == "hybrid_boundary"
    assert classify(cached=32, known=40, recurrent=True, **kw) == "chunk_granularity"  # any model stops there
    assert classify(cached=32, known=40, recurrent=False, **kw) == "chunk_granularity"
    assert classify(cached=16, known=40, recurrent=False, **kw) == "unrestorable"  # a whole chunk more was stored
    assert classify(cached=40, known=40, recurrent=False, **kw) is None  # nothing knew more: look further
    assert classify(cached=100, known=100, recurrent=True, **kw) == "none"  # all but the last token
    assert set(REASONS) == {
        "none",
        "new_content",
        "evicted",
        "other_model",
        "template_changed",
        "chunk_granularity",
        "hybrid_boundary",
        "unrestorable",
    }


def test_a_hybrid_model_misses_at_its_checkpoint_boundary(tmp_path, tmp_path_factory):
    """hybrid_boundary: a recurrent-state model restores only at a checkpoint, so a prompt that shares a
    stored prefix past the last checkpoint before it says so (qwen3_next: gated delta-net + attention)."""
    from mlx_lm import load

    hybrid = tiny_model(tmp_path_factory, arch="qwen3_next")
    filler = " The maps, the deeds and the census rolls of the harbour all go back to the founding." * 2
    user_a, user_b = "Where are the maps kept?" + filler, "Where are the deeds kept?" + filler
    parted = common_prefix(
        *(render(load(hybrid)[1], [SYS_A, {"role": "user", "content": u}]) for u in (user_a, user_b))
    )
    srv = ServerProcess(hybrid, new_store(tmp_path / "store"), "--max-resident", "1", "--max-disk", "none")
    srv.start()
    try:
        client = srv.openai()
        r = send(client, hybrid, [SYS_A, {"role": "user", "content": user_a}])
        conv_a = r.usage.model_extra["kvstore"]["conversation"]
        send(client, hybrid, [{"role": "system", "content": SYSTEM_Z}, {"role": "user", "content": "Hi."}])
        # A is out of memory: B shares its prompt up to `parted`, whole chunks of it past the system prompt,
        # but A's state was checkpointed only at the boundary before the system prompt's end and near
        # A's own end, not where B parts from it.
        r2 = send(client, hybrid, [SYS_A, {"role": "user", "content": user_b}])
        miss, ext = miss_of(r2), r2.usage.model_extra["kvstore"]
        assert miss["reason"] == "hybrid_boundary"
        assert miss["position"] == parted and miss["stored_in"] == conv_a
        assert 0 < ext["cached_disk_tokens"] < parted // TEST_CHUNK * TEST_CHUNK
        assert ext["cached_disk_tokens"] % TEST_CHUNK == 0
    finally:
        assert srv.stop() == 0
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
