"""The server's Prometheus metrics (GET /metrics), in a registry of their own per app."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

RATE_WINDOW_S = 10.0  # looplm_tokens_per_second averages over this many seconds


class Metrics:
    """Counters the handlers update as requests run; ratios are computed when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, num_loops: int, usage=None):
        """usage: a callable returning `Engine.usage()` (the KV-block gauges read it when scraped)."""
        r = self.registry = CollectorRegistry()
        if usage is not None:
            r.register(_CacheCollector(usage))
        self.running = Gauge("looplm_requests_running", "Requests whose decode is running", registry=r)
        self.waiting = Gauge("looplm_requests_waiting", "Requests admitted and waiting for a running slot", registry=r)
        self.requests = Counter("looplm_requests", "Finished requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("looplm_generated_tokens", "Tokens generated, by mode", ["mode"], registry=r)
        self.exit_loops = Counter("looplm_exit_loops", "Sum over generated tokens of the 1-based loop that emitted each", ["mode"], registry=r)
        self.loops = Counter("looplm_loops_computed", "Loops computed for generated tokens (rejected drafts included)", ["mode"], registry=r)
        self.drafted = Counter("looplm_speculative_drafted", "Draft tokens proposed by self-speculation", registry=r)
        self.accepted = Counter("looplm_speculative_accepted", "Draft tokens accepted by full-depth verification", registry=r)
        self.fallbacks = Counter("looplm_speculative_fallbacks", "Speculative requests that switched to full depth, by "
                                 "reason: drafts (they stopped paying) or load (more than full_depth_above requests)",
                                 ["reason"], registry=r)
        self.budget_misses = Counter("looplm_budget_misses", "Tokens that took longer than their time budget", registry=r)
        self.ttft = Histogram("looplm_time_to_first_token_seconds", "Time from admission to the first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("looplm_request_latency_seconds", "Time from admission to the last token", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        Gauge("looplm_num_loops", "Loops per token at full depth (T)", registry=r).set(num_loops)
        Gauge("looplm_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self._rate)
        Gauge("looplm_mean_exit_loop", "Mean exit loop of all generated tokens", registry=r).set_function(
            lambda: _ratio(self._sum(self.exit_loops), self._sum(self.tokens)))
        Gauge("looplm_loops_per_token", "Loops computed per generated token", registry=r).set_function(
            lambda: _ratio(self._sum(self.loops), self._sum(self.tokens)))
        Gauge("looplm_speculative_acceptance", "Accepted / proposed draft tokens", registry=r).set_function(
            lambda: _ratio(self._sum(self.accepted), self._sum(self.drafted)))
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add_tokens(self, mode: str, count: int, exit_loops: int) -> None:
        """Counts `count` new tokens of a request in `mode` whose exit loops sum to `exit_loops`."""
        self.tokens.labels(mode).inc(count)
        self.exit_loops.labels(mode).inc(exit_loops)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))

    def finish(self, mode: str, generations: list) -> None:
        """Adds a finished request's statistics, per generation: loops computed, speculation, budget misses."""
        for g in generations:
            n, stats = len(g.tokens), g.stats
            per_token = stats.get("loops_per_token", stats.get("loops_computed_per_token"))
            self.loops.labels(mode).inc(per_token * n if per_token is not None else sum(g.loops))
            if stats.get("drafted") is not None:
                self.drafted.inc(stats["drafted"])
                self.accepted.inc(stats.get("accepted") or 0)
            if stats.get("fallback_reason") is not None:
                self.fallbacks.labels(stats["fallback_reason"]).inc()
            if stats.get("budget_miss_rate") is not None:  # over the decode tokens: the first came from the prefill
                self.budget_misses.inc(round(stats["budget_miss_rate"] * max(n - 1, 0)))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    @staticmethod
    def _sum(counter: Counter) -> float:
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """looplm_kv_blocks_used / _free / _total per KV mode, and the engine's own running/waiting
    counts, read from `Engine.usage()` at scrape time."""

    def __init__(self, usage):
        self.usage = usage

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        u = self.usage()
        fams = {name: GaugeMetricFamily(f"looplm_kv_blocks_{name}", f"KV cache blocks {name}, per KV mode", labels=["kv"])
                for name in ("used", "free", "total")}
        for kv, c in u["caches"].items():
            fams["used"].add_metric([kv], c["blocks_used"])
            fams["free"].add_metric([kv], c["blocks_total"] - c["blocks_used"])
            fams["total"].add_metric([kv], c["blocks_total"])
        yield from fams.values()
        yield GaugeMetricFamily("looplm_engine_requests_running", "Requests the engine is decoding", value=u["running"])
        yield GaugeMetricFamily("looplm_engine_requests_waiting", "Requests waiting for cache room in the engine", value=u["waiting"])


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
