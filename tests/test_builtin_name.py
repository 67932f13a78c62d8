"""The bare name "builtin" in the Python API (issue 25, defect 8; found by the type checker: a 2-tuple of
defaults was unpacked into three names, a ValueError for every caller that gave no ARCH-SIZE)."""

from __future__ import annotations

import kvstore
from kvstore.agents import AgentManager, resolve_model
from kvstore.models.builtin import builtin_model_path


def test_bare_builtin_resolves_to_the_default_built_in_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    handle = resolve_model("builtin")
    assert handle.path == builtin_model_path(arch="llama", size="tiny", root=tmp_path / "models")
    assert resolve_model("builtin:llama-tiny").fingerprint == handle.fingerprint
    with kvstore.open(tmp_path / "s") as store:
        assert AgentManager("builtin", store).fingerprint == handle.fingerprint
