"""The one parser of the agent manager's record (kvstore.records.AgentRecord), lenient as its readers were."""

from kvstore.records import AGENT_RECORD_KEY, AgentRecord


def test_a_managers_record_reads_back_field_by_field():
    raw = {
        AGENT_RECORD_KEY: 1,
        "system_prompt": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
        "meta": {"kvstore_serve": {"anonymous": True}},
        "turns": [{"prefilled": 3}],
    }
    rec = AgentRecord.parse(raw)
    assert rec == AgentRecord(
        by_manager=True,
        system_prompt="be brief",
        messages=[{"role": "user", "content": "hi"}],
        meta={"kvstore_serve": {"anonymous": True}},
        turns=[{"prefilled": 3}],
    )


def test_metadata_someone_else_wrote_is_not_a_managers_record_but_keeps_its_meta():
    rec = AgentRecord.parse({"meta": {"demo": True}, "role": "r"})
    assert rec.by_manager is False
    assert rec.meta == {"demo": True}
    assert (rec.system_prompt, rec.messages, rec.turns) == (None, [], [])


def test_missing_or_mistyped_fields_read_as_empty():
    for raw in (None, [], "text", {AGENT_RECORD_KEY: 1, "messages": "x", "meta": [1], "turns": {}}):
        rec = AgentRecord.parse(raw)
        assert (rec.messages, rec.meta, rec.turns) == ([], {}, [])
    assert AgentRecord.parse({AGENT_RECORD_KEY: 1, "system_prompt": 7}).system_prompt == "7"
