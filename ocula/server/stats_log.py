"""The periodic throughput line (`--log_stats_interval` seconds; 0 turns it off)."""

from __future__ import annotations

import asyncio
import logging
import time

from ocula.server.serving import ServerState

logger = logging.getLogger("ocula.stats")


async def log_stats_forever(state: ServerState, interval: float) -> None:
    registry = state.metrics.registry

    def total(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    last_time = time.monotonic()
    last_prompt = total("ocula_prompt_tokens_total")
    last_generated = total("ocula_generation_tokens_total")
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        prompt, generated = (
            total("ocula_prompt_tokens_total"),
            total("ocula_generation_tokens_total"),
        )
        if prompt == last_prompt and generated == last_generated and not state.in_flight:
            last_time = now
            continue  # idle: say nothing
        stats = state.engine.stats
        elapsed = max(now - last_time, 1e-9)
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s, %d in flight, %s",
            (prompt - last_prompt) / elapsed,
            (generated - last_generated) / elapsed,
            state.in_flight,
            "no engine stats yet"
            if stats is None
            else (
                f"running {stats.num_running}, waiting {stats.num_waiting}, KV free "
                f"{stats.kv_free}/{stats.kv_capacity}, prefix-cache hit rate "
                f"{stats.prefix_cache_hit_rate:.1%}"
            ),
        )
        last_time, last_prompt, last_generated = now, prompt, generated
