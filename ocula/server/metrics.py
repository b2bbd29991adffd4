"""Prometheus metrics of one server, in a registry of its own (two servers in one process, as
in tests, never share counters). Latencies are measured in the front, where the client is;
engine gauges come from the latest stats the engine process sent."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ocula.engine.engine_core import EngineStats
from ocula.server.lightllm_metrics import LightLLMMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_req_total_len: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lightllm = LightLLMMetrics(r, model_name, max_req_total_len)
        self.requests = Counter(
            "ocula_requests", "Finished HTTP generation requests by outcome", ["status"], registry=r
        )
        self.ttft = Histogram(
            "ocula_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "ocula_inter_token_latency_seconds",
            "Gap between consecutive tokens",
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ocula_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ocula_request_queue_time_seconds",
            "Engine arrival to first scheduled step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ocula_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.generation_tokens = Counter("ocula_generation_tokens", "Generated tokens", registry=r)
        self.cached_prompt_tokens = Counter(
            "ocula_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.in_flight = Gauge(
            "ocula_requests_in_flight", "Requests the front is serving", registry=r
        )
        self.preparing = Gauge(
            "ocula_requests_preparing",
            "Requests whose images are being fetched, decoded and tiled before they are served",
            registry=r,
        )
        self.running = Gauge(
            "ocula_num_requests_running", "Requests in the running batch", registry=r
        )
        self.waiting = Gauge(
            "ocula_num_requests_waiting", "Requests waiting for KV or a batch slot", registry=r
        )
        self.kv_capacity = Gauge(
            "ocula_kv_cache_capacity_tokens", "Tokens the KV cache holds", registry=r
        )
        self.kv_free = Gauge(
            "ocula_kv_cache_free_tokens", "KV slots neither used nor cached", registry=r
        )
        self.kv_usage = Gauge(
            "ocula_kv_cache_usage_ratio", "Share of KV slots held by running requests", registry=r
        )
        self.prefix_tokens = Gauge(
            "ocula_prefix_cache_tokens", "Tokens held by the prefix cache", registry=r
        )
        self.prefix_evictable = Gauge(
            "ocula_prefix_cache_evictable_tokens",
            "Prefix-cache tokens no request references",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "ocula_prefix_cache_hit_rate",
            "Share of prompt tokens found in the prefix cache",
            registry=r,
        )
        self.preemptions = Gauge("ocula_num_preemptions", "Requests preempted so far", registry=r)
        self.image_cache_hits = Counter(
            "ocula_image_cache_hits", "Images whose embedding was cached (ViT skipped)", registry=r
        )
        self.image_cache_misses = Counter(
            "ocula_image_cache_misses", "Images that needed the vision encoder", registry=r
        )
        self.image_cache_entries = Gauge(
            "ocula_image_cache_entries", "Image embeddings held by the cache", registry=r
        )
        self.image_cache_tiles = Gauge(
            "ocula_image_cache_tiles",
            "Tiles the device pool of image embeddings has room for",
            registry=r,
        )
        self.image_cache_tiles_free = Gauge(
            "ocula_image_cache_tiles_free", "Tiles of the pool no cached image holds", registry=r
        )
        self.vit_batch_size = Histogram(
            "ocula_vit_batch_size",
            "Images per vision-encoder forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self._seen_hits = 0
        self._seen_misses = 0
        info = Gauge("ocula_model_info", "The served model", ["model_name"], registry=r)
        info.labels(model_name=model_name).set(1)

    def observe_step(self, stats: EngineStats, vit_batch_sizes: list[int]) -> None:
        """Called for every step the engine reports: its ViT batches, and the cumulative cache
        counts turned into counter increments here."""
        for size in vit_batch_sizes:
            self.vit_batch_size.observe(size)
        self.image_cache_hits.inc(max(0, stats.image_cache_hits - self._seen_hits))
        self.image_cache_misses.inc(max(0, stats.image_cache_misses - self._seen_misses))
        self._seen_hits = max(self._seen_hits, stats.image_cache_hits)
        self._seen_misses = max(self._seen_misses, stats.image_cache_misses)

    def update_engine(self, stats: EngineStats | None) -> None:
        if stats is None:
            return
        self.lightllm.update_engine(stats)
        self.image_cache_entries.set(stats.image_cache_entries)
        self.image_cache_tiles.set(stats.image_cache_tiles)
        self.image_cache_tiles_free.set(stats.image_cache_tiles_free)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_capacity.set(stats.kv_capacity)
        self.kv_free.set(stats.kv_free)
        held = stats.kv_capacity - stats.kv_free - stats.prefix_cache_evictable
        self.kv_usage.set(held / stats.kv_capacity if stats.kv_capacity else 0.0)
        self.prefix_tokens.set(stats.prefix_cache_tokens)
        self.prefix_evictable.set(stats.prefix_cache_evictable)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.preemptions.set(stats.num_preemptions)

    def render(self, stats: EngineStats | None) -> bytes:
        self.update_engine(stats)
        return generate_latest(self.registry)
