"""/metrics through a real server: every family from the start, exact counts after traffic."""
from __future__ import annotations

import math

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

N_REQUESTS, M_TOKENS = 3, 8


def scrape(server) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            key = s.name + (f"{{{labels}}}" if labels else "")
            if "le" not in s.labels:
                samples[key] = s.value
    return samples


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory()


def test_every_family_exists_at_zero_and_nothing_is_nan(server):
    before = scrape(server)
    for name in ("orchard:time_to_first_token_seconds_count", "orchard:inter_token_latency_seconds_count",
                 "orchard:e2e_request_latency_seconds_count", "orchard:request_queue_time_seconds_count",
                 "orchard:prompt_tokens_total", "orchard:generation_tokens_total",
                 "orchard:request_success_total{finished_reason=stop}", "orchard:num_requests_running",
                 "orchard:num_requests_waiting", "orchard:batch_size", "orchard:kv_cache_bytes",
                 "orchard:mlx_active_memory_bytes", "orchard:engine_up", "orchard:process_resident_memory_bytes",
                 "orchard:process_cpu_percent", "orchard:system_memory_used_ratio", "orchard:model_weight_bytes"):
        assert name in before, name
    assert before["orchard:generation_tokens_total"] == 0 and before["orchard:engine_up"] == 1
    assert not any(math.isnan(v) for v in before.values())


def test_counts_are_exact_after_n_requests_of_m_tokens(server):
    before = scrape(server)
    prompt_tokens = 0
    for i in range(N_REQUESTS):
        reply = requests.post(server.base_url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": M_TOKENS,
            "ignore_eos": True, "stream": i % 2 == 0}).text
        assert reply
        prompt_tokens += requests.post(server.base_url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 1}
        ).json()["usage"]["prompt_tokens"]
    after = scrape(server)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    requests_made = 2 * N_REQUESTS  # each loop also asked one 1-token request
    assert delta["orchard:inter_token_latency_seconds_count"] == N_REQUESTS * (M_TOKENS - 1)
    assert delta["orchard:time_to_first_token_seconds_count"] == requests_made
    assert delta["orchard:e2e_request_latency_seconds_count"] == requests_made
    assert delta["orchard:request_queue_time_seconds_count"] == requests_made
    assert delta["orchard:generation_tokens_total"] == N_REQUESTS * M_TOKENS + N_REQUESTS
    assert delta["orchard:prompt_tokens_total"] == 2 * prompt_tokens
    assert delta["orchard:request_success_total{finished_reason=length}"] == requests_made
    assert delta["orchard:http_requests_total{route=/v1/chat/completions,status=200}"] == requests_made


def test_prompts_never_reach_the_logs(server):
    secret = "zebra-quasar-7781"
    requests.post(server.base_url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": secret}], "max_tokens": 2})
    log = server.full_log()
    assert '"completion"' in log and secret not in log
