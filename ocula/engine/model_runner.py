"""Runs a `StepPlan` on the device: builds the `ForwardBatch`, runs the model, samples.

The runner owns everything that lives on the device: the weights, the KV pool and the slot table
(`slot_table[row, j]` is the KV slot of token j of the request in that row), the vision encoder
(`ImageEncoder`) and the CUDA graphs; `RequestSampler` keeps each request's sampling state.

`launch` queues a step's work on the device and returns without waiting for it; `collect`
waits for its tokens. A plan may decode a token that the step before sampled and that the host
has not seen yet (PLACEHOLDER_TOKEN): the runner takes it from `last_tokens`, the device row of
the latest token sampled per slot-table row.

Under tensor parallelism every rank has a runner over its shard and runs every plan (the
collectives inside the model need all ranks), but only rank 0 samples: the other ranks keep no
sampling state and return no tokens; with overlap on, rank 0 broadcasts each step's sampled
tokens to them (a device collective) for their `last_tokens`. The KV pool has the same number
of slots on every rank (the smallest any rank can hold), since rank 0's allocator hands out
slots for all of them.
"""

from __future__ import annotations

import logging

import torch

from ocula.config import EngineArgs
from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.distributed.vision_groups import VisionLayout, make_vision_group
from ocula.engine.cuda_graphs import DecodeGraphs, capture_forward_graphs
from ocula.engine.embedding_pool import EmbeddingPool, build_embedding_pool
from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.image_encoder import ImageEncoder, build_image_encoder
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.memory_budget import kv_pool_slots
from ocula.engine.model_setup import ModelSetup
from ocula.engine.piecewise_graphs import PiecewiseGraphs
from ocula.engine.plan_batch import build_forward_batch, image_rows, write_slot_table
from ocula.engine.prompt_logprobs import compute_prompt_logprobs, plan_wants_prompt_logprobs
from ocula.engine.request import PLACEHOLDER_TOKEN
from ocula.engine.runner_sampling import PendingSamples, RequestSampler
from ocula.engine.step_plan import SampledToken, ScheduledSequence, StepPlan
from ocula.kernels import triton_available
from ocula.layers.attention import get_attention_backend
from ocula.models.loader import load_model
from ocula.sampling.batch import host_to_device
from ocula.utils.device import to_device_async

logger = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """--attention_backend auto: the Triton kernels on CUDA (when Triton imports), the torch
    reference elsewhere."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and triton_available() else "reference"


class ModelRunner:
    def __init__(
        self, args: EngineArgs, setup: ModelSetup, tp: ParallelGroup = SINGLE_RANK
    ) -> None:
        """The runner of one rank of `tp`; `setup.device` is this rank's device. Every rank builds
        it with the same `args` (collective: vision groups and the KV pool size are agreed on)."""
        device, dtype = setup.device, setup.dtype
        self.device = device
        self.dtype = dtype
        layout = VisionLayout(args.visual_dp, args.effective_visual_tp)
        vision_tp = make_vision_group(tp, layout)
        backend_name = resolve_attention_backend(args.attention_backend, device)
        backend = get_attention_backend(backend_name)
        self.model = load_model(
            setup.model_dir,
            setup.model_config,
            dtype,
            device,
            tp,
            attention_backend=backend,
            vision_tp=vision_tp,
        )
        # Before the KV pool is sized, so that --mem_fraction holds them: the embedding cache, and
        # what the vision encoder's graphs and first run keep (their pool, the driver's share,
        # the convolution library's state: ~0.45 GiB beyond the pool for a toy ViT on an H100).
        self.embedding_pool: EmbeddingPool | None = None
        self.image_encoder: ImageEncoder | None = None
        if hasattr(self.model, "encode_images"):
            self.embedding_pool = build_embedding_pool(self.model, args, dtype, device, tp)
            self.image_encoder = build_image_encoder(self.model, args, tp, layout, dtype, device)
        num_layers, num_kv_heads, head_dim = self.model.kv_cache_shape()
        bytes_per_token = KVCachePool.bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        uses_graphs = (
            device.type == "cuda" and backend_name == "triton" and not args.disable_cudagraph
        )
        num_slots = args.max_total_token_num or kv_pool_slots(
            self.model, dtype, device, args, bytes_per_token, uses_graphs
        )
        num_slots = tp.min_over_ranks(num_slots)
        self.kv_pool = KVCachePool(num_layers, num_slots, num_kv_heads, head_dim, dtype, device)
        logger.info(
            "KV cache: %d tokens (%.2f GiB, %d bytes per token)",
            num_slots,
            num_slots * bytes_per_token / (1 << 30),
            bytes_per_token,
        )
        # A request never holds more slots than the pool has, so no row needs to be longer. The
        # last row is never handed out: it stays 0 (the scratch slot) for CUDA graph padding.
        table_width = min(args.max_req_total_len, num_slots)
        self.slot_table = torch.zeros(
            (args.running_max_req_size + 1, table_width), dtype=torch.int32, device=device
        )
        self.last_tokens = torch.zeros(
            args.running_max_req_size + 1, dtype=torch.int64, device=device
        )
        # Placeholders, and so `last_tokens`, exist only when the scheduler runs ahead of the
        # results; followers then need rank 0's sampled tokens too.
        self.feeds_last_tokens = not args.disable_overlap_schedule
        self.shares_sampled_tokens = tp.size > 1 and self.feeds_last_tokens
        self.tp = tp
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise_graphs: PiecewiseGraphs | None = None
        if uses_graphs:
            # Replays must launch the captured decode configuration (see TritonBackend).
            backend.decode_context_bound = table_width
            image_width = gather = None
            if self.embedding_pool is not None:
                image_width = self.model.config.text_config.hidden_size
                gather = self.embedding_pool.gather
            self.decode_graphs, self.piecewise_graphs = capture_forward_graphs(
                self.model,
                backend,
                self.kv_pool,
                self.slot_table,
                args,
                image_width,
                self.last_tokens,
                gather,
            )
        self.sampling = RequestSampler(device, args.seed) if tp.rank == 0 else None
        # Pages of `embedding_pool` (CPU int64, in row order) of each cached image's embedding,
        # by cache key. The scheduler's EmbeddingCacheIndex decides what is here and where
        # (plan.encoder_inputs with their pages, plan.encoder_frees).
        self.image_pages: dict[str, torch.Tensor] = {}
        if device.type == "cuda":
            self._warm_up_sampling()

    @torch.inference_mode()
    def _warm_up_sampling(self) -> None:
        """Loads the LM head's and the sampler's kernels before the first request (collective:
        the LM head gathers the vocabulary over the ranks)."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        hidden = torch.zeros(1, text_config.hidden_size, dtype=self.dtype, device=self.device)
        logits = self.model.compute_logits(hidden)
        if self.sampling is not None:
            self.sampling.warm_up(logits)

    # -- one step -----------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        """Runs the plan and waits for it; the sampled tokens on rank 0, [] on the other ranks."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingSamples | None:
        """Queues the plan's work on the device; rank 0's pending tokens (None when the plan
        samples nothing, and on the other ranks)."""
        if self.sampling is not None:
            self.sampling.follow(plan)
        write_slot_table(self.slot_table, plan.table_writes.flatten())
        self._update_image_embeddings(plan)
        if plan.is_empty:
            return None
        prompt_rows = plan_wants_prompt_logprobs(plan)  # they need every row's hidden state
        decode_graphs = self.decode_graphs
        if not prompt_rows and decode_graphs is not None and decode_graphs.takes(plan.sequences):
            return self._sample(plan, decode_graphs.run(plan.sequences))
        whole_step = self._whole_step_sequence(plan)
        if whole_step is not None:
            hidden = self._run_whole_step(plan, whole_step)
            count = whole_step.num_new_tokens
            sampled = hidden[count - 1 : count] if whole_step.samples else hidden[:0]
            logits = self.model.compute_logits(sampled)  # collective
            if prompt_rows:
                self._prompt_logprobs(plan, hidden)
            return self._sample(plan, logits)
        batch = self._build_batch(plan)
        if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(batch):
            hidden = self.piecewise_graphs.run(batch)
        else:
            hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # collective
        if prompt_rows:
            self._prompt_logprobs(plan, hidden)
        return self._sample(plan, logits)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> PendingSamples | None:
        """Samples the plan's sampling rows from `logits` (rank 0), and keeps the tokens in
        `last_tokens` for the next plan's placeholders (every rank, when they are shared)."""
        sampling_rows = [s.table_row for s in plan.sequences if s.samples]
        if not sampling_rows:
            return None
        pending = self.sampling.sample(plan, logits) if self.sampling is not None else None
        tokens = pending.token_ids if pending is not None else None
        if self.shares_sampled_tokens:  # collective: every rank samples the same rows
            if tokens is None:
                tokens = torch.empty(len(sampling_rows), dtype=torch.int64, device=self.device)
            self.tp.broadcast(tokens, src=0)
        if tokens is not None and self.feeds_last_tokens:
            self.last_tokens[host_to_device(sampling_rows, torch.int64, self.device)] = tokens
        return pending

    def _whole_step_sequence(self, plan: StepPlan) -> ScheduledSequence | None:
        """The plan's sequence when a whole-step graph runs the plan (the decode graphs did not
        take it): a single sequence of up to the graphs' size whose tokens are all on the host
        (no placeholder for a token of the step before)."""
        graphs = self.piecewise_graphs
        if graphs is None or len(plan.sequences) != 1:
            return None
        seq = plan.sequences[0]
        if seq.num_new_tokens > graphs.max_tokens or seq.token_ids[-1] == PLACEHOLDER_TOKEN:
            return None
        return seq

    def _run_whole_step(self, plan: StepPlan, seq: ScheduledSequence) -> torch.Tensor:
        rows = None
        if seq.image_slices:
            pool_rows = self.embedding_pool.row_indices
            batch_rows, sources = image_rows(plan, [0], self.image_pages, pool_rows)
            rows = (batch_rows.numpy(), sources.numpy())
        return self.piecewise_graphs.whole_steps.run(seq.token_ids, seq.start, seq.table_row, rows)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> None:
        """Computes the plan's prompt logprobs (every rank: the LM head is collective) and hands
        them to rank 0's sampler, which sends them with each request's first token."""
        alternatives = self.sampling.prompt_alternatives(plan) if self.sampling else None
        results = compute_prompt_logprobs(plan, hidden, self.model.compute_logits, alternatives)
        if self.sampling is not None:
            for request_id, (first_position, entries) in results.items():
                self.sampling.add_prompt_logprobs(request_id, first_position, entries)

    def collect(self, pending: PendingSamples | None) -> list[SampledToken]:
        """The tokens of a launched step (waits for the device); [] for None."""
        if pending is None or self.sampling is None:
            return []
        return self.sampling.resolve(pending)

    def _update_image_embeddings(self, plan: StepPlan) -> None:
        for key in plan.encoder_frees:
            self.image_pages.pop(key, None)
        if not plan.encoder_inputs or self.image_encoder is None or self.embedding_pool is None:
            return
        encoded = self.image_encoder.encode(plan.encoder_inputs)
        writes = []
        for item in plan.encoder_inputs:
            pages = torch.tensor(item.pages, dtype=torch.int64)
            writes.append((pages, encoded[item.key]))
            self.image_pages[item.key] = pages
        self.embedding_pool.write_all(writes)

    def take_vit_batch_sizes(self) -> list[int]:
        """Images per ViT forward run by this rank's ViT group since the last call."""
        return self.image_encoder.take_batch_sizes() if self.image_encoder is not None else []

    def _spliced_embeddings(
        self, plan: StepPlan, query_starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows of the batch whose embeddings come from images, and those embeddings."""
        if self.embedding_pool is None:
            return None
        rows = image_rows(plan, query_starts, self.image_pages, self.embedding_pool.row_indices)
        if rows is None:
            return None
        both = to_device_async(torch.stack(rows), self.device)
        return both[0], self.embedding_pool.gather(both[1])

    def _build_batch(self, plan: StepPlan) -> ForwardBatch:
        return build_forward_batch(
            plan,
            self.device,
            self.slot_table,
            self.kv_pool,
            self.last_tokens,
            self._spliced_embeddings,
        )
