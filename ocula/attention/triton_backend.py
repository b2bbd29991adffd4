"""The Triton attention backend: the paged kernels of `ocula.kernels` behind `AttentionBackend`.

Sequences with one new token (decodes) run the flash-decoding kernel
(`ocula.kernels.decode_attention`), the others the varlen prefill kernel
(`ocula.kernels.prefill_attention`). Which kernels run and every launch parameter come from the
batch's host lists (`query_lens_cpu`, `seq_lens_cpu`) and tensor shapes, never from device
tensors, so `attend` costs no device-to-host sync.

Importing this module imports Triton; the attention layer's registry imports it only when the
"triton" backend is picked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import triton

from ocula.engine.forward_batch import ForwardBatch
from ocula.kernels.decode_attention import MAX_SPLITS, decode_attention
from ocula.kernels.prefill_attention import prefill_attention
from ocula.kernels.rotary_store import NewTokens

if TYPE_CHECKING:
    from ocula.layers.attention import Attention

# Whether a step of decodes only rotates and stores its new K/V inside the decode kernel. A
# constant; the benchmark scripts' `--switches` (benchmarks/common.py) set it before building the
# engine.
ROTATE_IN_DECODE = True


class TritonBackend:
    """Paged attention in Triton kernels; same contract as `ReferenceBackend`.

    A step's sequences with one new token run through the flash-decoding kernel, GQA-packed; the
    others (prefill chunks) through the varlen prefill kernel, which skips the decode rows, both
    writing into one output. A step of decodes only is one decode launch (two with the merge).

    `decode_context_bound` (None by default) fixes the host-side context bound from which the
    decode kernel chooses its number of splits. Left None, each step uses the longest decode
    context rounded up to a power of two, so the launch configuration only changes when that
    crosses a power of two. A CUDA-graph runner sets it before capture, e.g. to the slot table's
    width, so that replays launch exactly the captured configuration: the kernels are correct for
    any seq_lens under any bound (the bound only decides how finely a context is split), but the
    number of splits must not depend on the batch being replayed.
    """

    def __init__(self, decode_context_bound: int | None = None) -> None:
        self.decode_context_bound = decode_context_bound

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim]; caches [slots, kv_heads, head_dim] -> [T, heads, head_dim],
        into `out` when given."""
        query_lens = batch.query_lens_cpu
        decode_lens = [
            n for q_len, n in zip(query_lens, batch.seq_lens_cpu, strict=True) if q_len == 1
        ]
        if len(decode_lens) < len(query_lens):
            out = prefill_attention(
                q,
                k_cache,
                v_cache,
                batch.slot_table,
                batch.table_rows,
                batch.query_start_loc,
                batch.seq_lens,
                scale,
                max_query_len=max(query_lens),
                sliding_window=sliding_window,
                skip_decode_rows=bool(decode_lens),
                out=out,
            )
        if decode_lens:
            bound = self.decode_bound(decode_lens)
            out = self._decode(q, k_cache, v_cache, batch, scale, sliding_window, bound, out)
        return out if out is not None else torch.empty_like(q)

    def attend_rotating(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        positions: torch.Tensor,
        cos_table: torch.Tensor,
        sin_table: torch.Tensor,
    ) -> torch.Tensor | None:
        """`attend` for q and k not rotated yet and this step's K/V not in the caches: a step of
        decodes only rotates and stores them inside the decode kernel (`decode_attention`'s
        `new_tokens`), one launch fewer per layer. None for any other step, for a single
        sequence, or with `ROTATE_IN_DECODE` off: the caller rotates and stores, then calls
        `attend`. A single sequence keeps the separate launch because it measured faster
        there (H200, InternVL3-8B shape: 4.00 against 3.98 ms per batch-1 step, while batches 8
        and 64 gained 0.03 ms; BENCHMARKS.md): every split program rotates the query again, and
        at batch 1 the splits are many."""
        if not ROTATE_IN_DECODE or not batch.decode_only or batch.num_seqs < 2:
            return None
        new = NewTokens(k, v, positions, batch.out_slots, cos_table, sin_table)
        bound = self.decode_bound(batch.seq_lens_cpu)
        return self._decode(q, k_cache, v_cache, batch, scale, sliding_window, bound, None, new)

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        bound: int,
        out: torch.Tensor | None,
        new_tokens: NewTokens | None = None,
    ) -> torch.Tensor:
        tables = (batch.slot_table, batch.table_rows, batch.query_start_loc, batch.seq_lens)
        return decode_attention(
            q,
            k_cache,
            v_cache,
            *tables,
            scale,
            max_context_len=bound,
            sliding_window=sliding_window,
            out=out,
            new_tokens=new_tokens,
        )

    def compile_decode_splits(
        self,
        attentions: Iterable[Attention],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_table: torch.Tensor,
        padding_row: int,
    ) -> int:
        """Compiles the decode kernel, as `attend` launches it, for every split count, before
        serving. Decode graphs compile only their batch sizes' counts, and for the in-kernel
        rotation; a step that mixes prefills with decodes launches the plain kernel eagerly with
        the count its number of sequences gives (16 for 5-8 sequences, 8 for 9-16, ...), a
        Triton constant that was otherwise compiled inside the first such step, ~1 s each on an
        H200 host (BENCHMARKS.md). `attentions`: the model's layers (their heads, head size,
        scale and window); q is a view of a fused qkv row, as the layers pass it; each launch
        reads only the scratch slot, through `padding_row`. Returns how many layer shapes were
        compiled.

        Not covered (still compiled on first use): runs without graphs, whose context bound and
        so split counts vary per step, and eager decode-only steps past the largest graph, which
        rotate in the kernel with a count no graph took (only with one KV head per rank).
        """
        shapes = {
            (a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.sliding_window) for a in attentions
        }
        device = slot_table.device
        table_rows = torch.full((1,), padding_row, dtype=torch.int64, device=device)
        query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=device)
        seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        for heads, kv_heads, head_dim, scale, window in shapes:
            width = (heads + 2 * kv_heads) * head_dim
            qkv = torch.zeros((1, width), dtype=k_cache.dtype, device=device)
            q = qkv[:, : heads * head_dim].unflatten(-1, (heads, head_dim))
            for exponent in range(MAX_SPLITS.bit_length()):
                decode_attention(
                    q,
                    k_cache,
                    v_cache,
                    slot_table,
                    table_rows,
                    query_start_loc,
                    seq_lens,
                    scale,
                    max_context_len=1,
                    sliding_window=window,
                    num_splits=1 << exponent,
                )
        return len(shapes)

    def decode_bound(self, decode_context_lens: list[int]) -> int:
        """The context bound the decode kernel chooses its splits from (host values only)."""
        if self.decode_context_bound is not None:
            return self.decode_context_bound
        return triton.next_power_of_2(max(decode_context_lens))
