"""`--tp 2` on one machine (CPU, gloo, fp32): greedy tokens equal the offline tp=1 engine's for
text models and InternVL with an image; bad splits are refused; SIGTERM stops every rank and a
rank that dies takes the server down naming it."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from ocula import LLM, SamplingParams
from ocula.distributed.launch import check_model_splits
from ocula.models.hf_config import load_text_config
from ocula.server.args import ServerArgs
from tests.helpers.images import random_png
from tests.helpers.server import RunningServer, assert_all_gone, free_port, start_server
from tests.helpers.tiny_internvl import make_hf_internvl
from tests.server.test_multimodal_server import TILE_TOKENS

TP_FLAGS = ("--tp", "2", "--max_total_token_num", "1024", "--max_req_total_len", "256")
PROMPTS = ["The quick brown fox", "Tensor parallel ranks", "hello hello hello"]
NEW_TOKENS = 12
EXIT_SECONDS = 20


def server_greedy_ids(server: RunningServer, prompt: str, images: Sequence[bytes] = ()) -> list:
    body = {
        "inputs": prompt,
        "parameters": {"do_sample": False, "max_new_tokens": NEW_TOKENS, "return_details": True},
        "multimodal_params": {
            "images": [{"type": "base64", "data": base64.b64encode(i).decode()} for i in images]
        },
    }
    response = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["tokens"]]


def offline_greedy_ids(checkpoint: Path, prompts: list) -> list[list[int]]:
    llm = LLM(str(checkpoint), max_total_token_num=1024)
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    return [output.token_ids for output in llm.generate(prompts, params)]


def rank_process(server: RunningServer, rank: int) -> psutil.Process:
    """Rank `rank`'s process: the pid rank 0 logged, checked to descend from the front."""
    match = re.search(rf"tensor-parallel rank {rank} started \(pid (\d+)\)", server.log())
    assert match, server.log()
    process = psutil.Process(int(match[1]))
    assert process in psutil.Process(server.process.pid).children(recursive=True)
    return process


# -- generation equals tp=1 ---------------------------------------------------------------------
def test_llama_tp2_matches_tp1_and_sigterm_stops_every_rank(tiny_checkpoint, tmp_path) -> None:
    checkpoint = tiny_checkpoint("llama")  # 4 heads, 2 KV heads: one KV head per rank
    expected = offline_greedy_ids(checkpoint, PROMPTS)
    server = start_server(checkpoint, tmp_path, *TP_FLAGS)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched decode steps
        got = list(pool.map(lambda p: server_greedy_ids(server, p), PROMPTS))
    assert got == expected
    # Prompt logprobs: the LM head over the prompt's rows is a collective of both ranks.
    params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=1)
    reference = LLM(str(checkpoint), max_total_token_num=1024).generate(PROMPTS[0], params)[0]
    body = {"prompt": PROMPTS[0], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    scored = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
    expected_scores = [e and e.logprob for e in reference.prompt_logprobs]
    assert scored[: len(expected_scores)] == pytest.approx(expected_scores, abs=1e-4)
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    assert rank_process(server, 1) in descendants
    assert server.stop(timeout=30) == 0, server.log()
    assert_all_gone(descendants, EXIT_SECONDS)


def test_qwen2_tp2_matches_tp1_and_a_dead_rank_stops_the_server(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("qwen2")
    expected = offline_greedy_ids(checkpoint, PROMPTS[:2])
    server = start_server(checkpoint, tmp_path, *TP_FLAGS)
    assert [server_greedy_ids(server, p) for p in PROMPTS[:2]] == expected
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    rank_process(server, 1).send_signal(signal.SIGKILL)
    try:
        code = server.process.wait(EXIT_SECONDS)
    except Exception:
        server.stop()
        raise
    assert code != 0
    assert re.search(r"tensor-parallel rank 1 \(pid \d+\) died \(signal SIGKILL\)", server.log())
    assert_all_gone(descendants, EXIT_SECONDS)


@pytest.mark.parametrize(
    "layout",
    [
        ("--tp", "2"),  # ViT split like the LLM: visual_dp 1 x visual_tp 2
        ("--tp", "2", "--visual_dp", "2", "--visual_tp", "1"),
        ("--tp", "4", "--visual_dp", "2", "--visual_tp", "2"),
    ],
    ids=["tp2-vit1x2", "tp2-vit2x1", "tp4-vit2x2"],
)
def test_internvl_tp_matches_tp1_and_ranks_leave_when_the_front_is_killed(tmp_path, layout) -> None:
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")  # ViT: 2 heads, one per rank
    image = random_png(90, 60, 7)
    prompt = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERNVL_IMAGE_LENGTH", "4")
        expected = offline_greedy_ids(
            checkpoint,
            [
                {"prompt": prompt, "images": [image]},
                {
                    "prompt": prompt.replace("<img></img>", "<img></img><img></img>"),
                    "images": [image, random_png(40, 70, 3)],
                },
            ],
        )
    flags = (*TP_FLAGS[2:], *layout, "--enable_multimodal")
    server = start_server(checkpoint, tmp_path, *flags, env=TILE_TOKENS)
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    try:
        images = [image, random_png(40, 70, 3)]  # two misses in one step: one per ViT group
        two_image_prompt = prompt.replace("<img></img>", "<img></img><img></img>")
        with ThreadPoolExecutor(2) as pool:
            got = list(
                pool.map(
                    lambda case: server_greedy_ids(server, *case),
                    [(prompt, [image]), (two_image_prompt, images)],
                )
            )
        assert got == expected
        assert [server_greedy_ids(server, prompt, [image])] == expected[:1]  # cache hit
    finally:
        # Not a clean shutdown: rank 0 notices that the front is gone, stops rank 1 and leaves.
        server.process.kill()
        server.process.wait()
    assert_all_gone(descendants, EXIT_SECONDS)


# -- refusals -----------------------------------------------------------------------------------
def test_tp_that_does_not_divide_the_heads_is_refused_naming_valid_values(tiny_checkpoint):
    command = [sys.executable, "-m", "ocula.server.api_server", "--port", str(free_port())]
    model = ["--model_dir", str(tiny_checkpoint("llama")), "--tp", "3"]
    result = subprocess.run(command + model, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert re.search(r"4 attention heads .*valid --tp values: 1, 2, 4", result.stderr)
    with pytest.raises(ValueError, match="valid --tp values: 1, 2, 4"):
        check_model_splits(load_text_config(tiny_checkpoint("llama")), 3, 3)
    check_model_splits(load_text_config(tiny_checkpoint("llama")), 4, 4)  # 2 KV heads, replicated


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tp": 3, "nnodes": 2}, r"--tp \(3\) must be a multiple of --nnodes \(2\)"),
        ({"tp": 2, "nnodes": 2, "node_rank": 2}, r"--node_rank must be in 0\.\.1"),
        ({"tp": 2, "visual_dp": 3}, r"--visual_dp \(3\) x --visual_tp \(0\) must equal --tp"),
        ({"tp": 4, "visual_dp": 2, "visual_tp": 1}, "--visual_dp 2 --visual_tp 2"),
        ({"tp": 2, "visual_dp": 1, "visual_tp": 1}, r"--visual_dp \(1\) x --visual_tp \(1\)"),
    ],
)
def test_unsupported_layouts_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs(**overrides).validate()


def test_offline_llm_points_tp_at_the_server(tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="ocula serve --tp 2"):
        LLM(str(tiny_checkpoint("llama")), tp=2)
