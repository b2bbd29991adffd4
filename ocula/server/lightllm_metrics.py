"""LightLLM's Prometheus series, beside Ocula's own in the same `/metrics`: the names, labels
(`model_name`) and buckets LightLLM's monitor uses, so that dashboards and monitors written for
a LightLLM server read an Ocula one as they are.

What each means here: a request is one engine request (an HTTP generation request with all its
sequences; a completions batch counts each prompt); its duration runs from its admission to its
last token, the first-token duration to its first token, the time per token is the mean gap
between a sequence's later tokens; input length and cache
length are its prompt's tokens and those the prefix cache served. `lightllm_request_failure`
counts requests that ended in an error (a client that leaves is neither a success nor a failure).
Gauges follow the engine's latest report: running requests (`lightllm_num_running_reqs`, and
`lightllm_batch_current_size`, the running batch), waiting ones (`lightllm_queue_size`) and the
prefix cache's hit rate.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ocula.engine.engine_core import EngineStats

# LightLLM's buckets: durations grow by half from 1.5 ms (35 of them, past 20 minutes); lengths
# are hundredths of the request length limit.
DURATION_BUCKETS = tuple(0.001 * 1.5**k for k in range(1, 36))
LENGTH_STEPS = 100


class LightLLMMetrics:
    def __init__(
        self, registry: CollectorRegistry, model_name: str, max_req_total_len: int
    ) -> None:
        self.model_name = model_name
        lengths = tuple(max_req_total_len / LENGTH_STEPS * i for i in range(LENGTH_STEPS + 1))
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry).labels(
                model_name
            )

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry).labels(model_name)

        self.requests = counter("lightllm_request_count", "Requests admitted")
        self.successes = counter("lightllm_request_success", "Requests answered whole")
        self.failures = counter("lightllm_request_failure", "Requests ended by an error")
        self.prompt_tokens = counter("lightllm_prompt_tokens_total", "Prompt tokens of requests")
        self.generated_tokens = counter("lightllm_generation_tokens_total", "Generated tokens")
        self.duration = histogram(
            "lightllm_request_duration", "Admission to last token (s)", DURATION_BUCKETS
        )
        self.first_token = histogram(
            "lightllm_request_first_token_duration",
            "Admission to first token (s)",
            DURATION_BUCKETS,
        )
        self.per_token = histogram(
            "lightllm_request_mean_time_per_token_duration",
            "Mean gap between a request's later tokens (s)",
            DURATION_BUCKETS,
        )
        self.input_length = histogram(
            "lightllm_request_input_length", "Prompt tokens of a request", lengths
        )
        self.output_length = histogram(
            "lightllm_request_generated_tokens", "Tokens a request generated", lengths
        )
        self.cache_length = histogram(
            "lightllm_cache_length", "Prompt tokens the prefix cache served", lengths
        )
        self.running = gauge("lightllm_num_running_reqs", "Requests running")
        self.batch_size = gauge("lightllm_batch_current_size", "Requests in the running batch")
        self.queue_size = gauge("lightllm_queue_size", "Requests waiting")
        self.cache_hit_rate = gauge("lightllm_cache_hit_rate", "Prefix cache hit rate")

    def request_admitted(self) -> None:
        self.requests.inc()

    def request_finished(
        self,
        outcome: str,
        prompt_tokens: int,
        cached_tokens: int,
        generated_tokens: int,
        sequences: int,
        first_token_s: float | None,
        last_token_s: float | None,
    ) -> None:
        """One admitted request's end; `outcome` is "ok", "aborted" or anything else for an
        error; `generated_tokens` counts all its `sequences`; the times are from admission."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        if outcome == "aborted":
            return
        if outcome != "ok":
            self.failures.inc()
            return
        self.successes.inc()
        self.input_length.observe(prompt_tokens)
        self.output_length.observe(generated_tokens)
        self.cache_length.observe(cached_tokens)
        if first_token_s is not None and last_token_s is not None:
            self.first_token.observe(first_token_s)
            self.duration.observe(last_token_s)
            per_sequence = generated_tokens / sequences  # they run side by side
            if per_sequence > 1:
                self.per_token.observe((last_token_s - first_token_s) / (per_sequence - 1))

    def update_engine(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.batch_size.set(stats.num_running)
        self.queue_size.set(stats.num_waiting)
        self.cache_hit_rate.set(stats.prefix_cache_hit_rate)
