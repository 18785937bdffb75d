"""Prometheus metrics in a registry owned by one app (never the process-global one), plus the JSON
snapshot behind /v1/stats that the web page's live panel polls.

Engine numbers (KV blocks, running/waiting, generated tokens, GPU memory) are read from
`engine.stats()` at scrape time by a custom collector (a snapshot the engine publishes after every
step: a scrape never waits for a decoder step); the server itself
observes time to first token and counts requests by outcome.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from runtime.api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class _EngineCollector:
    """Reads the engine's stats (and the server queue) each time the registry is collected."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("appliance_kv_blocks_used", "KV cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily("appliance_kv_blocks_total", "KV cache blocks in the pool",
                                value=s.kv_blocks_total)
        yield GaugeMetricFamily("appliance_requests_running", "requests the engine is generating for",
                                value=s.requests_running)
        yield GaugeMetricFamily("appliance_requests_waiting",
                                "requests accepted but not yet running (preparing or queued)",
                                value=s.requests_waiting)
        yield CounterMetricFamily("appliance_generated_tokens", "completion tokens generated",
                                  value=s.generated_tokens_total)
        if s.gpu_memory_bytes is not None:
            yield GaugeMetricFamily("appliance_gpu_memory_bytes", "GPU memory used by the engine",
                                    value=s.gpu_memory_bytes)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats = stats
        self.registry.register(_EngineCollector(stats))
        ProcessCollector(registry=self.registry)
        self.ttft = Histogram("appliance_time_to_first_token_seconds",
                              "seconds from request arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.requests = Counter("appliance_requests", "chat completion requests by outcome",
                                ["outcome"], registry=self.registry)
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)          # prime: the next call measures since now
        self._last_ttft: float | None = None
        self._started = time.time()

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self._last_ttft = seconds

    def count(self, outcome: str) -> None:
        """outcome: ok, cancelled (the client left), client_error (4xx), rejected (429, 503),
        server_error (exactly the 500s sent, before the first byte or as an SSE error event)"""
        self.requests.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The /v1/stats JSON: engine numbers + process CPU % (since the last snapshot) and RSS."""
        s = self._stats()
        mem = self._proc.memory_info()
        return {
            "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total,
            "kv_bytes_per_token": s.kv_bytes_per_token,
            "requests_running": s.requests_running,
            "requests_waiting": s.requests_waiting,
            "generated_tokens_total": s.generated_tokens_total,
            "device": s.device, "gpu_memory_bytes": s.gpu_memory_bytes,
            "cpu_percent": self._proc.cpu_percent(None), "rss_bytes": mem.rss,
            "last_time_to_first_token": self._last_ttft,
            "uptime_seconds": time.time() - self._started, "time": time.time(),
        }
