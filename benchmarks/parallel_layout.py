"""One tensor-parallel layout of bench_parallel.py, measured in a process of its own.

This process is rank 0, built as the server's engine process builds it: it starts ranks
1..tp-1 (`FollowerRanks`, which follow its step plans) and runs an `EngineCore` over their
group, with the offline `LLM`'s front (`LLMEngine` over that core: tokenizer, the same image
preprocessing, outputs) in front of it. Parts, in order, each skipped with the reason when the time
limit would not allow it:

- tokens: greedy tokens of engine_agreement.py's prompts (32 x 16; half text, half one image);
- vit: requests of one distinct 448 x 448 image and a short question each, max_new_tokens 1,
  all added at once after a warm-up batch of the same shape. The vision-encoder stage of each
  step is timed on rank 0 (`EncodeTimer`), so images/s counts only the ViT and the exchange of
  embeddings between ViT groups; the batch's time to its last first token (LLM prefill, CPU
  preprocessing and the pixels' trip in the step plan included) is kept beside it;
- decode: ms per `core.step()` at batch 64 with 1,024-token prompts once every prefill is done;
- offline: the multimodal workload of bench_offline.py (or fewer requests / tokens), last.

    python -m benchmarks.parallel_layout --checkpoint DIR --tp 2 --visual_dp 1 --visual_tp 2 \
        --out layout.json [--tiny]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_engine import DECODE_MAX_NEW_TOKENS
from benchmarks.bench_engine import FULL as ENGINE_FULL
from benchmarks.bench_engine import TINY as ENGINE_TINY
from benchmarks.common import (
    Deadline,
    engine_options,
    exit_on_sigterm,
    log,
    run_metadata,
    run_part,
    write_json,
)
from benchmarks.engine_agreement import TINY_TOKENS, TOKENS, agreement_prompts
from benchmarks.engine_driver import (
    add_to_core,
    finish,
    run_offline,
    step_until_all_sampled,
    timed_steps,
)
from benchmarks.parallel_vit import vit
from benchmarks.workloads import MULTIMODAL, OfflineWorkload, image_prompt, token_prompts
from ocula.config import EngineArgs
from ocula.distributed.launch import check_model_splits
from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.engine.engine_core import EngineCore
from ocula.engine.llm_engine import LLMEngine
from ocula.engine.model_setup import resolve_model
from ocula.engine.tp_worker import FollowerRanks, RankDiedError
from ocula.sampling.params import SamplingParams

# Image seeds of the offline warm-up, far from the other parts' (parallel_vit.py's, 3000+ and
# 5000+; the agreement prompts', 2000+): no part finds another's embeddings in the image cache.
WARMUP_SEED = 900
# Seconds a part needs on a GPU before it is worth starting (the offline run stops itself at
# the deadline and reports what finished).
NEEDS_S = {"tokens": 10, "vit": 15, "decode": 15, "offline": 20}


def start_engine(options: dict[str, Any]) -> tuple[LLMEngine, FollowerRanks | None]:
    """Rank 0's engine as ocula/server/engine_process.py starts it."""
    args = EngineArgs(**options)
    args.validate()
    setup = resolve_model(args)
    followers: FollowerRanks | None = None
    group = SINGLE_RANK
    if args.tp > 1:
        check_model_splits(setup.model_config, args.tp, args.effective_visual_tp)
        followers = FollowerRanks(args, setup)
        setup, group = followers.setup, followers.group
    try:
        return LLMEngine(args, setup, EngineCore(args, setup, group)), followers
    except BaseException:
        if followers is not None:
            followers.stop(graceful=False)
        raise


def greedy_token_ids(engine: LLMEngine, prompts: list[Any], new_tokens: int) -> list[list[int]]:
    """Greedy outputs of all prompts in one batch, in prompt order (as `LLM.generate` and
    engine_agreement.py's `greedy_tokens`)."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    ids = [f"tokens-{i}" for i in range(len(prompts))]
    outputs: dict[str, list[int]] = {}
    try:
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[output.request_id] = list(output.token_ids)
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
    return [outputs[request_id] for request_id in ids]


def decode(engine: LLMEngine, tiny: bool, deadline: Deadline) -> dict[str, Any]:
    sizes = ENGINE_TINY if tiny else ENGINE_FULL
    batch_size = 4 if tiny else 64
    core = engine.core
    prompts = token_prompts(10 + batch_size, batch_size, sizes["context"])  # bench_engine's
    batch = add_to_core(engine, prompts, DECODE_MAX_NEW_TOKENS)
    try:
        prefill_steps = step_until_all_sampled(core, batch, deadline)
        for _ in range(sizes["warmup"]):
            batch.record(core.step())
        timing = timed_steps(core, batch, core.runner.device, sizes["timed"])
    finally:
        finish(core, batch)
    timing.pop("context_lens_first_step")
    per_step = timing.pop("tokens_per_step")
    ms = timing["ms_per_step"]
    log(f"decode batch {batch_size}: {ms:.2f} ms/step")
    return {
        "batch": batch_size,
        "context": sizes["context"],
        "prefill_steps": prefill_steps,
        "pure_decode_steps": all(n == batch_size for n in per_step),
        "output_tokens_per_s": batch_size / ms * 1e3,
        **timing,
    }


def offline(engine: LLMEngine, workload: OfflineWorkload, deadline: Deadline) -> dict[str, Any]:
    warm = [image_prompt(WARMUP_SEED + i, 20) for i in range(4)] + token_prompts(901, 4, 64)
    started = time.perf_counter()
    run_offline(engine, warm, 8, Deadline(None))
    warmup_s = time.perf_counter() - started
    run = run_offline(engine, workload.prompts(seed=7), workload.new_tokens, deadline)
    summary = run.summary()
    log(f"offline: {summary['output_tokens_per_s']:,.0f} tok/s in {run.seconds:.2f} s")
    return {"workload": vars(workload), "warmup_seconds": warmup_s, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--visual_dp", type=int, default=1)
    parser.add_argument("--visual_tp", type=int, default=1)
    parser.add_argument("--visual_infer_batch_size", type=int, default=8)
    parser.add_argument("--engine_args", default="", help="engine flags for this layout")
    parser.add_argument("--offline_requests", type=int, default=MULTIMODAL.requests, help="0: off")
    parser.add_argument("--offline_new_tokens", type=int, default=MULTIMODAL.new_tokens)
    parser.add_argument("--time_limit", type=float, help="seconds this process may take")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    deadline = Deadline(args.time_limit)
    exit_on_sigterm()
    layout = {"tp": args.tp, "visual_dp": args.visual_dp, "visual_tp": args.visual_tp}
    options = engine_options(
        args.checkpoint,
        args.engine_args,
        **layout,
        enable_multimodal=True,
        visual_infer_batch_size=args.visual_infer_batch_size,
    )
    results: dict[str, Any] = {"layout": layout, "options": options}
    followers: FollowerRanks | None = None
    graceful = False
    try:
        started = time.monotonic()
        engine, followers = start_engine(options)
        results["load_seconds"] = time.monotonic() - started
        results["meta"] = run_metadata(engine.core.runner.device)
        log(f"layout {layout}: engine ready in {results['load_seconds']:.1f} s")

        def part(name: str, fn: Any) -> None:
            # Kept if the process is stopped (SIGTERM) inside the part; replaced otherwise.
            results[name] = {"error": "stopped before it finished (the layout's deadline)"}
            run_part(name, results, fn, deadline, NEEDS_S[name])
            write_json(args.out, results)  # what is measured so far survives a SIGKILL
            if followers is None:
                return
            failed = "error" in results[name]  # a failed collective: did a rank die?
            dead = followers.dead_rank_message(3.0 if failed else 0.0)
            if dead is not None:
                raise RankDiedError(dead)

        new_tokens = TINY_TOKENS if args.tiny else TOKENS
        part("tokens", lambda: greedy_token_ids(engine, agreement_prompts(args.tiny), new_tokens))
        part("vit", lambda: vit(engine, args.tiny, deadline))
        part("decode", lambda: decode(engine, args.tiny, deadline))
        if args.offline_requests > 0:
            workload = OfflineWorkload(
                "multimodal", args.offline_requests, args.offline_new_tokens, 60, True
            )
            part("offline", lambda: offline(engine, workload, deadline))
        graceful = True
    except Exception as error:  # recorded with the rank that died, if one did
        message = f"{type(error).__name__}: {error}"
        dead = None
        if followers is not None and not isinstance(error, RankDiedError):
            dead = followers.dead_rank_message()
        results["error"] = f"{dead}; {message}" if dead else message
        raise
    finally:
        if followers is not None:
            followers.stop(graceful=graceful)  # the next layout starts on free GPUs and ports
        write_json(args.out, results)


if __name__ == "__main__":
    main()
