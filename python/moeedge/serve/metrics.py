"""GET /metrics in Prometheus' text format: the engine's queue and throughput, the expert
cache's hits and bytes read, resident bytes by kind and the budget, read when scraped."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeedge.runtime.measure import rss_bytes

# seconds; a decode token on a budget-starved CPU can take seconds, a resident one milliseconds
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One registry per server (tests start several in one process)."""

    def __init__(self, engine_snapshot, model):
        self.registry = CollectorRegistry()
        self._snapshot = engine_snapshot
        self._model = model
        self.registry.register(self)
        self._hist = {
            "ttft": Histogram("moeedge_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=_BUCKETS, registry=self.registry),
            "itl": Histogram("moeedge_time_between_tokens_seconds", "Between a request's consecutive tokens",
                             buckets=_BUCKETS, registry=self.registry),
        }

    def observe(self, name: str, seconds: float) -> None:
        self._hist[name].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):
        s = self._snapshot()
        cache = self._model.cache.stats()
        plan = self._model.plan

        def gauge(name, doc, value):
            return GaugeMetricFamily(f"moeedge_{name}", doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(f"moeedge_{name}", doc, value=value)

        yield gauge("queue_length", "Requests waiting for a free slot", s["queue_length"])
        yield gauge("active_sequences", "Requests holding a KV slot (prefilling or decoding)", s["active_sequences"])
        yield gauge("max_batch", "KV slots: sequences decoded together at most", s["max_batch"])
        yield gauge("decode_tokens_per_second", "Generated tokens a second over the last 10 s", s["recent_tok_s"])
        yield counter("prompt_tokens", "Prompt tokens run through the model", s["prompt_tokens"])
        yield counter("reused_prompt_tokens", "Prompt tokens found in a slot's kept KV, not run again",
                      s["reused_tokens"])
        yield counter("generated_tokens", "Tokens generated", s["generated_tokens"])
        yield counter("decode_steps", "Decode steps (each runs every decoding sequence's token)", s["decode_steps"])
        yield counter("decode_seconds", "Time in decode steps", s["decode_seconds"])
        yield counter("prefill_seconds", "Time in prefill chunks", s["prefill_seconds"])
        requests = CounterMetricFamily("moeedge_requests", "Requests ended, by how", labels=["outcome"])
        for outcome, n in sorted(s["requests"].items()):
            requests.add_metric([outcome], n)
        yield requests
        gets = cache["hits"] + cache["misses"]
        yield counter("cache_hits", "Expert cache hits", cache["hits"])
        yield counter("cache_misses", "Expert cache misses", cache["misses"])
        yield gauge("cache_hit_rate", "Expert cache hits over gets, since start", cache["hits"] / gets if gets else 0)
        yield counter("bytes_read", "Expert bytes read from storage", cache["bytes_read"])
        resident = GaugeMetricFamily("moeedge_resident_bytes", "Resident memory by kind", labels=["kind"])
        for kind, value in (("dense", plan.dense_bytes), ("kv_cache", plan.kv_cache_bytes),
                            ("expert_cache", cache["resident_bytes"]), ("process", rss_bytes())):
            resident.add_metric([kind], value)
        yield resident
        yield gauge("memory_budget_bytes", "The memory budget of the whole process", plan.budget_bytes)
        yield gauge("expert_cache_budget_bytes", "The expert cache's share of the budget", cache["budget_bytes"])
        remote = getattr(self._model.runner, "remote", None)
        if remote is not None:   # --peer
            peers = CounterMetricFamily("moeedge_peer_experts", "Missing experts of decode steps, by where they ran",
                                        labels=["where"])
            for where, n in sorted(remote.counters.items()):
                peers.add_metric([where], n)
            yield peers
