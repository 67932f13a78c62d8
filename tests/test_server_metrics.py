"""/metrics and the server's log: real requests through the openai SDK and httpx against a `kvstore serve` process,
the metrics read back with prometheus_client's own text parser, the log read from the process's output."""

from __future__ import annotations

import re
import signal

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, chat, new_store, tiny_model

import kvstore

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


def scrape(srv: ServerProcess) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    r = httpx.get(srv.url + "/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_cache_sources(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "s"), "--progress-every", "0").start()
    try:
        before = scrape(srv)
        client = srv.openai()
        msgs = chat(model_path, "Hello there.")
        usages = []
        for _ in range(2):  # the second turn continues the first: its prefix comes from memory
            r = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=6)
            usages.append(r.usage)
            msgs += [
                {"role": "assistant", "content": r.choices[0].message.content},
                {"role": "user", "content": "Go on."},
            ]
        pieces = list(client.completions.create(model=model_path, prompt="Once upon a time", max_tokens=4, stream=True))
        assert pieces
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
        bad = httpx.post(srv.url + "/v1/chat/completions", json={"model": model_path}, timeout=60)
        assert bad.status_code == 400
        after = scrape(srv)
    finally:
        assert srv.stop() == 0

    moved = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert moved("kvstore_requests_total", route="/v1/chat/completions", status="200") == 2
    assert moved("kvstore_requests_total", route="/v1/completions", status="200") == 1
    assert moved("kvstore_requests_total", route="/v1/chat/completions", status="404") == 1
    assert moved("kvstore_requests_total", route="/v1/chat/completions", status="400") == 1
    assert moved("kvstore_requests_total", route="/metrics", status="200") == 1  # the first scrape
    chat_prompt = sum(u.prompt_tokens for u in usages)
    assert moved("kvstore_prompt_tokens_total") > chat_prompt  # and the completion's prompt
    ram = sum(u.model_extra["kvstore"]["cached_ram_tokens"] for u in usages)
    disk = sum(u.model_extra["kvstore"]["cached_disk_tokens"] for u in usages)
    assert ram > 0 and moved("kvstore_cached_tokens_total", source="ram") >= ram
    assert moved("kvstore_cached_tokens_total", source="disk") >= disk
    assert moved("kvstore_cache_hits_total", source="ram") >= 1
    assert moved("kvstore_generated_tokens_total") == sum(u.completion_tokens for u in usages) + 4
    assert moved("kvstore_prefilled_tokens_total") == moved("kvstore_prompt_tokens_total") - moved(
        "kvstore_cached_tokens_total", source="ram"
    ) - moved("kvstore_cached_tokens_total", source="disk")
    assert moved("kvstore_ttft_seconds_count") == 3
    assert moved("kvstore_generation_tokens_per_second_count") == 3
    assert value(after, "kvstore_store_bytes") > 0
    assert value(after, "kvstore_queue_depth") == 0  # nothing waits: the scrape does not count itself
    log = srv.log.read_text()
    # One line per request, the refused ones included, with the turn's figures on the served ones.
    served = re.findall(r"POST /v1/chat/completions 200 [0-9.]+s (\S+): prompt (\d+), cached (\d+) .* ttft ", log)
    assert [(int(p), int(c)) for _, p, c in served] == [
        (u.prompt_tokens, u.prompt_tokens_details.cached_tokens) for u in usages
    ]
    assert re.search(r"POST /v1/chat/completions 404 [0-9.]+s", log)
    assert re.search(r"POST /v1/chat/completions 400 [0-9.]+s", log)
    assert re.search(r"POST /v1/completions 200 [0-9.]+s .*generated 4,", log)
    assert "GET /metrics" not in log  # scrapes and health checks are debug-level


def test_count_miss_and_evictions_reach_metrics(tmp_path, model_path):
    """The functions the model thread calls (miss explanations, the disk budget) show up in the scrape."""
    from kvstore.server import metrics

    def parsed() -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples
        }

    before = parsed()
    metrics.count_miss("new_content", 40)
    metrics.count_miss("new_content", 2)
    metrics.count_evictions(3)
    after = parsed()
    assert (
        value(after, "kvstore_cache_misses_total", reason="new_content")
        - value(before, "kvstore_cache_misses_total", reason="new_content")
        == 2
    )
    assert (
        value(after, "kvstore_cache_missed_tokens_total", reason="new_content")
        - value(before, "kvstore_cache_missed_tokens_total", reason="new_content")
        == 42
    )
    assert (
        value(after, "kvstore_evictions_total", cause="budget")
        - value(before, "kvstore_evictions_total", cause="budget")
        == 3
    )


def test_long_prefill_logs_progress_and_a_stop_is_not_a_client_gone(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "s"), "--progress-every", "0").start()
    try:
        client = srv.openai()
        long_text = " ".join(f"word{i}" for i in range(900))  # ~2,000 tokens: four 512-token prefill steps
        r = client.chat.completions.create(
            model=model_path, messages=[{"role": "user", "content": long_text}], max_tokens=2
        )
        total = r.usage.prompt_tokens
        assert total > 1600
        stream = client.chat.completions.create(
            model=model_path, messages=chat(model_path, "Tell me a long story."), max_tokens=20000, stream=True
        )
        for chunk in stream:  # until the turn is generating
            if chunk.choices and chunk.choices[0].delta.content:
                break
        srv.proc.send_signal(signal.SIGTERM)
        for _ in stream:  # the server ends the stream as it shuts down
            pass
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    progress = re.findall(r"prefill \S+: (\d+) of (\d+) tokens, \d+ tok/s, about \d+s left", log)
    assert len(progress) >= 2 and all(int(of) == total - 1 for _, of in progress), log
    assert [int(d) for d, _ in progress] == sorted(int(d) for d, _ in progress)
    stopped = [line for line in log.splitlines() if "Tell" not in line and "stopped:" in line]
    assert len(stopped) == 1 and "the server is shutting down" in stopped[0], log
    assert "went away" not in stopped[0]
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
