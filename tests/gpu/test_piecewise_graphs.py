"""Piecewise CUDA graphs: batches that are not plain decodes (prefills, chunks of a prompt mixed
with other requests' decodes, a follow-up after a cached prefix, image prompts) replay graphs cut
at every attention call; a step of one sequence replays its bucket's whole-step graph. Greedy
tokens must equal transformers' (fp32) and the engine without them, over buckets filled exactly
and with padding rows. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, reference_continuations

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
# Chunks of at most 7 prompt tokens per request, up to 40 tokens a step: long prompts are
# prefilled over several steps beside the other requests' decodes.
MIXED_STEPS = {"chunked_prefill_size": 7, "batch_max_tokens": 40}


def engine(checkpoint, **options) -> LLM:
    return LLM(
        str(checkpoint), device="cuda", data_type="fp32", max_total_token_num=8192, **options
    )


def record_piecewise_runs(
    llm: LLM, monkeypatch, spliced: list[int] | None = None, seqs: list[int] | None = None
) -> list[int]:
    """Token counts of the batches the piecewise graphs ran (spies around the real `run` of the
    pieces and of the whole-step graphs), into `spliced` the number of image rows of each and
    into `seqs` its number of sequences (one: the whole-step graph ran, more: the pieces)."""
    graphs = llm.engine.core.runner.piecewise_graphs
    assert graphs is not None
    counts: list[int] = []
    real_run = graphs.run
    real_whole_run = graphs.whole_steps.run

    def record(num_tokens: int, num_seqs: int, image_rows: int) -> None:
        counts.append(num_tokens)
        if seqs is not None:
            seqs.append(num_seqs)
        if spliced is not None:
            spliced.append(image_rows)

    def run(batch):
        rows = batch.spliced_rows
        record(batch.num_tokens, batch.num_seqs, 0 if rows is None else rows.shape[0])
        return real_run(batch)

    def whole_run(token_ids, start, table_row, image_rows=None):
        record(len(token_ids), 1, 0 if image_rows is None else len(image_rows[0]))
        return real_whole_run(token_ids, start, table_row, image_rows)

    monkeypatch.setattr(graphs, "run", run)
    monkeypatch.setattr(graphs.whole_steps, "run", whole_run)
    return counts


def record_whole_replays(llm: LLM, monkeypatch) -> list[int]:
    """Bucket sizes of the whole-step graphs replayed (a spy around each graph's replay)."""
    whole_steps = llm.engine.core.runner.piecewise_graphs.whole_steps
    replays: list[int] = []

    class Spy:
        def __init__(self, size: int, graph: torch.cuda.CUDAGraph) -> None:
            self.size, self.graph = size, graph

        def replay(self) -> None:
            replays.append(self.size)
            self.graph.replay()

    spies = {
        size: (Spy(size, graph), hidden) for size, (graph, hidden) in whole_steps.graphs.items()
    }
    monkeypatch.setattr(whole_steps, "graphs", spies)
    return replays


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2", "mistral"])
def test_piecewise_steps_equal_transformers(tiny_checkpoint, arch, monkeypatch) -> None:
    checkpoint = tiny_checkpoint(arch)
    prompts = [*PROMPTS, " ".join(PROMPTS) * 2]  # the last needs several chunks
    alone = "a prompt of its own, prefilled alone"
    *expected, expected_alone = reference_continuations(checkpoint, [*prompts, alone], NEW_TOKENS)
    llm = engine(checkpoint, **MIXED_STEPS)
    assert llm.engine.core.runner.piecewise_graphs.buckets == [16, 32, 40]
    seqs: list[int] = []
    counts = record_piecewise_runs(llm, monkeypatch, seqs=seqs)
    replays = record_whole_replays(llm, monkeypatch)
    assert [out.token_ids for out in llm.generate(prompts, GREEDY)] == expected
    assert any(count < 16 for count in counts) and any(16 < count < 40 for count in counts)
    assert any(n > 1 for n in seqs)  # the pieces ran
    assert len(replays) == seqs.count(1)  # every single-sequence step, and only those, whole
    # One prompt at a time: its prefill chunks are steps of one sequence, whole-step graphs.
    seqs.clear()
    replays.clear()
    assert llm.generate(alone, GREEDY)[0].token_ids == expected_alone
    assert seqs and all(n == 1 for n in seqs) and len(replays) == len(seqs)


@pytest.mark.parametrize("arch, overrides", [("qwen2", {}), ("mistral", {"sliding_window": 5})])
def test_piecewise_equals_eager_on_cached_prefixes_and_long_prompts(
    tiny_checkpoint, monkeypatch, arch, overrides
) -> None:
    checkpoint = tiny_checkpoint(arch, **overrides)
    first = PROMPTS[2] * 3
    prompts = [first, first + " and then?", first + PROMPTS[3], PROMPTS[1] * 30]  # last: eager

    def run(**options) -> tuple[list[list[int]], list[int], list[int]]:
        llm = engine(checkpoint, **{"piecewise_graph_max_tokens": 64, **options})
        has_graphs = llm.engine.core.runner.piecewise_graphs is not None
        counts, replays = [], []
        if has_graphs:
            counts = record_piecewise_runs(llm, monkeypatch)
            replays = record_whole_replays(llm, monkeypatch)
        outputs = [llm.generate(prompt, GREEDY)[0] for prompt in prompts]  # one at a time
        tokens = [out.token_ids for out in outputs]
        assert len(replays) == len(counts)  # one sequence a step: all in whole-step graphs
        return tokens, [out.num_cached_tokens for out in outputs], counts

    tokens, cached, counts = run()
    assert cached[1] > 0 and cached[2] > 0  # the follow-ups attend over a cached prefix
    assert len(counts) == 3 and max(counts) <= 64  # the long prompt ran eagerly
    assert counts[1] not in (16, 32, 48, 64)  # a query shorter than its bucket's capture
    assert run(disable_cudagraph=True)[:2] == (tokens, cached)
    assert run(piecewise_graph_max_tokens=0)[:2] == (tokens, cached)


def test_image_prompts_in_piecewise_graphs(tmp_path, monkeypatch) -> None:
    from tests.engine.test_multimodal_generation import reference_tokens
    from tests.helpers.images import random_png
    from tests.helpers.tiny_internvl import make_hf_internvl

    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "4")
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    prompts = [
        {"prompt": "what is <image> here?", "images": [random_png(40, 40, 1)]},
        {"prompt": "<image>\ndescribe it", "images": [random_png(200, 90, 2)]},
        {
            "prompt": "compare <img></img> and <image> please",
            "images": [random_png(120, 60, 3), random_png(50, 170, 4)],
        },
    ]
    llm = engine(checkpoint, **MIXED_STEPS)
    spliced: list[int] = []
    record_piecewise_runs(llm, monkeypatch, spliced)
    got = [out.token_ids for out in llm.generate(prompts, GREEDY)]
    assert any(spliced)  # image rows went through the graphs' splice
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == reference_tokens(llm, checkpoint, prompt, NEW_TOKENS)
    spliced.clear()
    text_only = "a question without any image"  # alone: a step with no image rows at all
    got.append(llm.generate(text_only, GREEDY)[0].token_ids)
    assert spliced and not any(spliced)
    # A new image prompt alone: image rows through the whole-step graphs' splice.
    solo = {"prompt": "<image> alone: what is it?", "images": [random_png(90, 130, 5)]}
    spliced.clear()
    replays = record_whole_replays(llm, monkeypatch)
    alone = llm.generate(solo, GREEDY)[0].token_ids
    assert alone == reference_tokens(llm, checkpoint, solo, NEW_TOKENS)
    assert any(spliced) and len(replays) == len(spliced)
    eager = engine(checkpoint, disable_cudagraph=True, **MIXED_STEPS)
    expected = [out.token_ids for out in eager.generate(prompts, GREEDY)]
    expected.append(eager.generate(text_only, GREEDY)[0].token_ids)
    assert got == expected
