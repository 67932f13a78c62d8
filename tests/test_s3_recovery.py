"""The agent manager's recovery from a damaged blob, with the blobs on S3 (issue 25, defect 4).

A blob changed or deleted in the bucket behind the store's back: the next turn of an agent that needs it
recomputes the KV from the token history, discards the blob (its rows and its object) and answers exactly as
an undamaged store does. Before the fix, `Store.discard_blob` asked the S3 backend for a file path it does
not have (AttributeError) and the agent stayed unusable until `fsck --repair`.

Needs KVSTORE_TEST_S3_URL and the AWS_* keys of that server (`.ci/run` starts SeaweedFS on loopback).
"""

from __future__ import annotations

import os
import warnings

import pytest
from conftest import TEST_CHUNK, s3_store_args
from test_agents import _blob_of_first_chunk, preamble

import kvstore
from kvstore.agents import AgentManager, RecoveryWarning, resolve_model

S3_URL = os.environ.get("KVSTORE_TEST_S3_URL")
pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not S3_URL, reason="needs an S3 server: set KVSTORE_TEST_S3_URL (.ci/run does)"),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from kvstore.models.builtin import builtin_model_path

    return resolve_model(builtin_model_path(arch="llama", size="tiny", root=tmp_path_factory.mktemp("models")))


def _bucket():
    """A plain obstore client on the test bucket: the hand that changes objects behind the store's back."""
    from obstore.store import S3Store

    from kvstore.blob.s3 import parse_url

    loc = parse_url(S3_URL)
    return S3Store(
        loc.bucket, config={"endpoint": loc.endpoint, "region": "us-east-1"}, client_options={"allow_http": True}
    )


def _two_turns(store, handle):
    mgr = AgentManager(handle, store)
    mgr.create("a", preamble(handle)).chat("First?", max_tokens=8)
    return AgentManager(handle, store)  # a fresh manager: the second turn restores from the store


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_agent_turn_recovers_from_a_blob_damaged_in_the_bucket(tmp_path, llama, damage):
    import obstore as obs

    with kvstore.open(tmp_path / "local", chunk_size=TEST_CHUNK) as local:  # the undamaged reference
        want = _two_turns(local, llama).get("a").chat("Second?", max_tokens=12)
        assert want.stats.restored_tokens > 0 and not want.stats.recovered

    index, kw = s3_store_args(tmp_path)
    with kvstore.open(index, **kw, chunk_size=TEST_CHUNK) as store:
        _two_turns(store, llama)
        blob = _blob_of_first_chunk(store, "a")
        key = store.blobs.key(blob)
    bucket = _bucket()
    if damage == "flip":
        data = bytearray(obs.get(bucket, key).bytes())
        data[len(data) // 2] ^= 0x01
        obs.put(bucket, key, bytes(data))
    else:
        obs.delete(bucket, key)

    # A fresh disk tier: the turn reads the bucket's copy, not the one the save left in the first tier.
    with kvstore.open(index, **{**kw, "cache_dir": str(tmp_path / "tier2")}, chunk_size=TEST_CHUNK) as store:
        assert not store.fsck().ok
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = AgentManager(llama, store).get("a").chat("Second?", max_tokens=12)
        assert len([w for w in caught if issubclass(w.category, RecoveryWarning)]) == 1
        assert got.stats.recovered
        assert got.tokens == want.tokens
        report = store.fsck()  # the recomputed chunks were saved again: the bucket holds good bytes
        assert report.ok, report.problems
        assert store.blobs.verify(blob) or not store.blobs.exists(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RecoveryWarning)
            again = AgentManager(llama, store).load("a")
        assert again.tokens == store.tokens("a")
