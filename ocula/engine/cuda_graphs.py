"""CUDA graphs of the decode forward: one graph per batch-size bucket, replayed instead of
launching every layer's kernels from Python.

A decode step (every sequence computes one token, no image rows) of B sequences runs in the
graph of the smallest bucket >= B; rows B..bucket-1 are padding that reads and writes only the
scratch slot (slot 0) through the slot table's padding row, whose entries are all 0. The graph
covers the model forward and the LM head (with their collectives under tensor parallelism);
sampling stays outside, on the replayed logits.

Contract with the attention backend: inside the graph the host lists of the batch are fixed at
capture time (`query_lens_cpu` all 1, `seq_lens_cpu` all equal to the slot table's width, the
longest context any request can have), so a backend may size its launch from them but must read
the actual lengths from the device tensors. Each step copies its sequences' tokens, positions,
lengths and table rows into the graph's static inputs in one transfer (`graph_inputs`); the graph
itself reads placeholder tokens (sampled by the step before, not yet on the host) from the
runner's `last_tokens` and the new tokens' KV slots from the slot table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ocula.config import EngineArgs
from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.graph_inputs import InputField, StaticInputBlock
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.piecewise_graphs import PiecewiseGraphs, token_count_buckets
from ocula.engine.step_plan import ScheduledSequence
from ocula.layers.attention import Attention, AttentionBackend
from ocula.utils.device import no_garbage_collection, replay_once

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (every 16 past 64, 32 past 128) up to the max."""
    sizes = [size for size in (1, 2, 4) if size < max_batch_size]
    size = 8
    while size < max_batch_size:
        sizes.append(size)
        size += 8 if size < 64 else 16 if size < 128 else 32
    sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_pool: KVCachePool,
        slot_table: torch.Tensor,
        padding_row: int,
        max_batch_size: int,
        last_tokens: torch.Tensor,
    ) -> None:
        """`slot_table[padding_row]` must stay all zeros (the scratch slot). `last_tokens`: the
        runner's latest sampled token per slot-table row, read for placeholder tokens."""
        self.model = model
        self.kv_pool = kv_pool
        self.slot_table = slot_table
        self.last_tokens = last_tokens
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_batch_size = self.buckets[-1]
        device = slot_table.device
        size = self.max_batch_size
        # The step's values, one copy a step (`graph_inputs`); the graph derives the rest.
        self.inputs = StaticInputBlock(
            [
                InputField("input_ids", size, torch.int64),  # < 0: a placeholder
                InputField("positions", size, torch.int64),
                InputField("seq_lens", size, torch.int32, pad=1),
                InputField("table_rows", size, torch.int64, pad=padding_row),
            ],
            device,
        )
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: tuple | None = None  # the graphs' memory pool, once captured

    def _static_batch(self, size: int) -> ForwardBatch:
        """The bucket's batch on the static inputs; inside a capture, reading placeholders from
        `last_tokens` and the new tokens' KV slots from the slot table become part of the graph
        (padding rows: the padding row's slot 0, token 0 at position 0, a context of one)."""
        view = self.inputs.view
        rows = view("table_rows")[:size]
        positions = view("positions")[:size]
        input_ids = view("input_ids")[:size]
        return ForwardBatch(
            input_ids=torch.where(input_ids < 0, self.last_tokens[rows], input_ids),
            positions=positions,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=view("seq_lens")[:size],
            slot_table=self.slot_table,
            table_rows=rows,
            out_slots=self.slot_table[rows, positions],
            logits_indices=self.logits_indices[:size],
            kv_pool=self.kv_pool,
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.slot_table.shape[1]] * size,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(batch)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, sharing one memory pool. Collective under
        tensor parallelism: every rank captures the same buckets in the same order."""
        pool = None
        for size in reversed(self.buckets):
            self._forward(self._static_batch(size))  # compiles the kernels, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(self._static_batch(size))
            pool = graph.pool()
            self.graphs[size] = graph
        replay_once(self.graphs.values())
        self.pool = pool
        logger.info("CUDA graphs captured for decode batch sizes %s", self.buckets)

    def takes(self, sequences: Sequence[ScheduledSequence]) -> bool:
        """Whether a step of these sequences is a decode the graphs run: at most the largest
        bucket, each sequence one new token that samples, no image rows."""
        return len(sequences) <= self.max_batch_size and all(
            s.num_new_tokens == 1 and s.samples and not s.image_slices for s in sequences
        )

    def run(self, sequences: Sequence[ScheduledSequence]) -> torch.Tensor:
        """Logits [B, vocab] of a decode step of B sequences (`takes`); KV slots already in the
        slot table. A view of the graph's output, valid until the graph replays again."""
        count = len(sequences)
        size = next(bucket for bucket in self.buckets if bucket >= count)
        self.inputs.stage(
            {
                "input_ids": [s.token_ids[0] for s in sequences],
                "positions": [s.start for s in sequences],
                "seq_lens": [s.start + 1 for s in sequences],
                "table_rows": [s.table_row for s in sequences],
            }
        )
        self.graphs[size].replay()
        return self.logits[size][:count]


def graph_buckets(args: EngineArgs, table_width: int) -> tuple[list[int], list[int]]:
    """The decode batch sizes and the piecewise token counts the graphs capture for a slot table
    `table_width` wide (no piecewise sizes when --piecewise_graph_max_tokens is 0)."""
    decode = batch_size_buckets(min(args.graph_max_batch_size, args.running_max_req_size))
    max_tokens = min(args.piecewise_graph_max_tokens, args.effective_batch_max_tokens, table_width)
    return decode, token_count_buckets(max_tokens) if max_tokens > 0 else []


def capture_forward_graphs(
    model: nn.Module,
    backend: AttentionBackend,
    kv_pool: KVCachePool,
    slot_table: torch.Tensor,
    args: EngineArgs,
    image_hidden_size: int | None,
    last_tokens: torch.Tensor,
    gather_image_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[DecodeGraphs, PiecewiseGraphs | None]:
    """The decode graphs, and the piecewise graphs of other short batches unless
    --piecewise_graph_max_tokens is 0, captured in one memory pool. The padding row is the slot
    table's last (kept all zeros by the runner). `last_tokens`: see `DecodeGraphs`;
    `image_hidden_size` and `gather_image_rows`: see `PiecewiseGraphs`. Collective under tensor
    parallelism."""
    decode_sizes, piecewise_sizes = graph_buckets(args, slot_table.shape[1])
    padding_row = slot_table.shape[0] - 1
    free_before = torch.cuda.mem_get_info(slot_table.device)[0]
    decode = DecodeGraphs(model, kv_pool, slot_table, padding_row, decode_sizes[-1], last_tokens)
    piecewise = None
    if piecewise_sizes:
        piecewise = PiecewiseGraphs(
            model,
            backend,
            kv_pool,
            slot_table,
            padding_row,
            piecewise_sizes[-1],
            image_hidden_size,
            kv_pool.dtype,
            gather_image_rows,
        )
    with no_garbage_collection():
        decode.capture()
        if piecewise is not None:
            piecewise.capture(decode.pool)
    used = free_before - torch.cuda.mem_get_info(slot_table.device)[0]
    # Compare with the estimate memory_budget reserved (logged when the KV pool was sized).
    logger.info("CUDA graphs took %.3f GiB of device memory", used / 2**30)
    # A backend may offer to compile, now, kernels an eager step would otherwise compile on
    # first use (the Triton backend's decode split counts).
    compile_splits = getattr(backend, "compile_decode_splits", None)
    if compile_splits is not None:
        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        compile_splits(attentions, *kv_pool.layer(0), slot_table, padding_row)
        torch.cuda.synchronize()
    return decode, piecewise
