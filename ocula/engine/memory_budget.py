"""How many KV-cache slots fit in `--mem_fraction` of the GPU.

The KV pool gets what is left of `total * mem_fraction` after the memory already in use (weights,
the image-embedding pool of a vision model, the CUDA context, and what the measuring forwards
below leave behind for good: the kernels they loaded, the GEMM libraries' workspaces), the
activation peak of the largest eager forward (`--batch_max_tokens` prompt tokens) and, when CUDA
graphs are on, the language model's graph pool. Those graphs are captured after the KV pool
exists (they read its addresses), so their share is estimated beforehand: the activations of
their largest forward (all share one pool and never replay at the same time) plus what each graph
keeps allocated between replays (decode logits, the final hidden states of each piecewise
bucket's pieces and of its whole-step graph, the shared attention buffers). The vision encoder's
graphs are captured before sizing (`ModelRunner`), so what they hold counts as in use. Not
reserved (they live in the rest of the GPU, 1 - mem_fraction): the vision encoder's activations
when it runs more tiles than its graphs take, and what the driver itself holds for the language
model's graphs and the kernels first loaded after sizing (~0.15 GiB for a toy model on an H100).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ocula.config import EngineArgs
from ocula.engine.cuda_graphs import graph_buckets
from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool
from ocula.layers.attention import Attention

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass
class ForwardMemory:
    peak: int  # bytes a forward of that many prompt tokens allocates beyond the weights
    hidden_row: int  # bytes of one token's final hidden state
    logits_row: int  # bytes of one row of logits


@torch.inference_mode()
def measure_forward(
    model: nn.Module, dtype: torch.dtype, device: torch.device, num_tokens: int
) -> ForwardMemory:
    """Runs one forward of `num_tokens` prompt tokens (and the LM head on its last row) over a
    scratch KV pool of that size, and reports its peak."""
    num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
    scratch = KVCachePool(num_layers, num_tokens, num_kv_heads, head_dim, dtype, device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    table = torch.arange(1, num_tokens + 1, dtype=torch.int32, device=device)[None, :]
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        # Positions wrap at the model's context length: only the shapes matter here.
        positions=torch.arange(num_tokens, device=device) % model.max_context_len(),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        slot_table=table,
        table_rows=torch.zeros(1, dtype=torch.int64, device=device),
        out_slots=table[0],
        logits_indices=torch.tensor([num_tokens - 1], device=device),
        kv_pool=scratch,
        query_lens_cpu=[num_tokens],
        seq_lens_cpu=[num_tokens],
    )
    hidden = model(batch)
    logits = model.compute_logits(hidden[batch.logits_indices])
    torch.cuda.synchronize(device)
    memory = ForwardMemory(
        peak=torch.cuda.max_memory_allocated(device) - base,
        hidden_row=hidden[0].nbytes,
        logits_row=logits[0].nbytes,
    )
    del scratch, batch, hidden, logits
    torch.cuda.empty_cache()
    return memory


def graph_pool_bytes(
    model: nn.Module, dtype: torch.dtype, device: torch.device, args: EngineArgs
) -> int:
    """Upper estimate of the language model's CUDA-graph pool (see the module doc). The slot
    table's width is bounded by --max_req_total_len here (the pool is not sized yet), which can
    only add piecewise buckets, so the estimate errs high."""
    decode, piecewise = graph_buckets(args, args.max_req_total_len)
    largest = measure_forward(model, dtype, device, max([decode[-1], *piecewise]))
    widths = [m.num_heads * m.head_dim for m in model.modules() if isinstance(m, Attention)]
    return estimate_graph_pool(decode, piecewise, largest, max(widths) * dtype.itemsize)


def estimate_graph_pool(
    decode: list[int], piecewise: list[int], largest: ForwardMemory, attention_row: int
) -> int:
    """The pool of graphs captured for these buckets: the activations of the largest graphed
    forward (`largest`, measured at max(decode + piecewise) tokens) plus what stays allocated
    between replays: each decode bucket's logits, each piecewise bucket's final hidden states
    (twice: its pieces' and its whole-step graph's), and the piecewise q and output buffers
    (`attention_row` bytes per token each)."""
    held = sum(decode) * largest.logits_row + 2 * sum(piecewise) * largest.hidden_row
    if piecewise:
        held += 2 * piecewise[-1] * attention_row
    return largest.peak + held


def kv_pool_slots(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    args: EngineArgs,
    bytes_per_token: int,
    with_graphs: bool,
) -> int:
    """KV slots this rank can hold (see the module doc); raises when none fit."""
    if device.type != "cuda":
        return max(1, CPU_DEFAULT_KV_BYTES // bytes_per_token)
    activations = measure_forward(model, dtype, device, args.effective_batch_max_tokens).peak
    graphs = graph_pool_bytes(model, dtype, device, args) if with_graphs else 0
    # Read after those forwards: what they left behind for good (the kernels they loaded, the
    # GEMM libraries' workspaces) is then counted as in use, not taken out of the KV pool later.
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = total * args.mem_fraction - used - activations - graphs
    gib = 2**30
    if budget < bytes_per_token:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {used / gib:.1f} GiB in use, activation "
            f"peak {activations / gib:.1f} GiB, CUDA graphs {graphs / gib:.1f} GiB, "
            f"--mem_fraction {args.mem_fraction} of {total / gib:.1f} GiB; raise --mem_fraction, "
            "lower --batch_max_tokens, --graph_max_batch_size or --image_cache_gb (image "
            "embeddings)"
        )
    logger.info(
        "memory: %.2f GiB in use, activations %.2f GiB, CUDA graphs %.2f GiB, KV cache %.2f GiB",
        used / gib,
        activations / gib,
        graphs / gib,
        budget / gib,
    )
    return int(budget // bytes_per_token)
