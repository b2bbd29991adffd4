"""What LightLLM's `/generate` parameters mean in engine terms: the `SamplingParams` of a
`GenerateParameters` (`to_sampling_params`), its stop conditions, and the room left for new tokens
(`fit_max_new_tokens`).

Rules (LightLLM's as of its current release, except where noted):
- `do_sample: false` is greedy (temperature 0) whatever temperature/top_p/top_k say; so is a
  temperature below 1e-5. Unset, `do_sample` is the model's generation_config.json value, else
  false: a request that only sets a temperature is greedy, as in LightLLM. Values given are still
  range-checked (temperature -1 is a 400 even with `do_sample: false`). `do_sample: true` with no
  temperature samples even when the model's generation_config.json says `do_sample: false` (at
  that config's temperature, else 1.0). Unset knobs take the model's generation_config.json, then
  the global defaults.
- `max_new_tokens` defaults to 65535; a value past the room the prompt leaves (the request
  length limit and the KV cache's size) is lowered to that room rather than refused; a prompt
  that leaves no room is a 400.
- `min_new_tokens` counts the token that ends the sequence: EOS cannot come before the N-th
  token (the engine's `min_new_tokens`, like vLLM's, counts the tokens before it: N - 1).
- `seed`: -1 (LightLLM's default) is a random seed; with a seed, sequence i of n is sampled with
  seed + i. `n` defaults to `best_of` (else 1); both given, they must agree.
- `logit_bias`: the token ids of its keys are never sampled, whatever the values (LightLLM reads
  it that way); `disable_prompt_cache` computes the whole prompt.
- `skip_special_tokens` and `add_special_tokens` default to true; the latter applies to string
  inputs only, token-id inputs are used as sent.
- `stop_sequences`: strings matched on the text, token-id lists on the ids, see `stop_conditions`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ocula.sampling.param_checks import MAX_STOP_CHARS, MAX_STOP_STRINGS
from ocula.sampling.params import DEFAULT_TEMPERATURE, SamplingParams
from ocula.server.async_engine import RequestError
from ocula.server.protocol_lightllm import GenerateParameters, StopSequence

# LightLLM decodes greedily below this temperature.
GREEDY_TEMPERATURE_THRESHOLD = 1e-5
# LightLLM's max_new_tokens when a request sets none (then lowered to the room left).
DEFAULT_MAX_NEW_TOKENS = 65535
# LightLLM's seed for "pick one at random".
RANDOM_SEED = -1


def fit_max_new_tokens(requested: int | None, prompt_len: int, limit: int) -> int:
    """The new tokens a request of `prompt_len` tokens may generate: `requested` (LightLLM's
    default when None), lowered to the room the prompt leaves under `limit` (the most tokens one
    sequence may hold). Raises RequestError when the prompt leaves no room."""
    room = limit - prompt_len
    if room < 1:
        raise RequestError(
            f"inputs: the prompt has {prompt_len} tokens; with one new token that is over the "
            f"limit of {limit} tokens (--max_req_total_len, the model's context length or the "
            "KV cache's size)"
        )
    return min(DEFAULT_MAX_NEW_TOKENS if requested is None else requested, room)


def stop_conditions(
    tokenizer: Any, stop_sequences: StopSequence | list[StopSequence] | None, vocab_size: int
) -> tuple[list[str], list[list[int]]]:
    """(stop strings, stop token-id runs) of LightLLM's `stop_sequences`, as LightLLM today
    reads them: a string is matched on the output text, which ends before it (unless
    `include_stop_str_in_output`); a list of ints (a bare list is one sequence) is matched on
    the generated ids, and its tokens' text stays in the output.

    A string that is one special or added token, maybe after whitespace, is that token's id
    run instead: special tokens never reach the text, and LightLLM's multimodal guide has
    clients send `" <|im_end|>"` (from when LightLLM encoded strings and dropped the first id, a
    BOS for some tokenizers). Empty strings and lists stop nothing, as in LightLLM.
    """
    if stop_sequences is None:
        return [], []
    sequences = [stop_sequences] if isinstance(stop_sequences, str) else stop_sequences
    if sequences and all(isinstance(item, int) for item in sequences):
        sequences = [sequences]  # a bare list of ids is one token-id stop sequence
    # The engine's limits, checked before any tokenizing (each string may be encoded here).
    texts = [sequence for sequence in sequences if isinstance(sequence, str)]
    if len(sequences) > MAX_STOP_STRINGS or sum(map(len, texts)) > MAX_STOP_CHARS:
        raise RequestError(
            f"parameters.stop_sequences: at most {MAX_STOP_STRINGS} sequences and "
            f"{MAX_STOP_CHARS} characters in all"
        )
    strings: list[str] = []
    runs: list[list[int]] = []
    for sequence in sequences:
        if isinstance(sequence, str):
            special = _special_token_id(tokenizer, sequence)
            if special is not None:
                runs.append([special])
            elif sequence:
                strings.append(sequence)
            continue
        bad = [i for i in sequence if not 0 <= i < vocab_size]
        if bad:
            raise RequestError(
                f"parameters.stop_sequences: token ids must be in [0, {vocab_size}); got {bad[:5]}"
            )
        if sequence:
            runs.append(list(sequence))
    return strings, runs


def _special_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the special or added token that `text` is, leading whitespace aside."""
    name = text.lstrip()
    added = getattr(tokenizer, "added_tokens_encoder", {})
    return added.get(name) if name else None


def to_sampling_params(
    parameters: GenerateParameters,
    tokenizer: Any,
    vocab_size: int,
    generation_config: Mapping[str, Any] | None,
    want_logprobs: bool,
) -> SamplingParams:
    """The engine's SamplingParams for LightLLM `parameters` (rules in this module's docstring);
    raises RequestError naming the parameter at fault."""
    for name in ("regular_constraint", "guided_grammar", "guided_json"):
        if getattr(parameters, name):
            raise RequestError(
                f"parameters.{name}: constrained decoding is not supported by this server"
            )
    stop, stop_runs = stop_conditions(tokenizer, parameters.stop_sequences, vocab_size)
    max_new_tokens = parameters.max_new_tokens
    params = SamplingParams(
        n=parameters.num_sequences,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
        min_new_tokens=parameters.min_new_tokens,
        temperature=parameters.temperature,
        top_p=parameters.top_p,
        top_k=parameters.top_k,
        repetition_penalty=parameters.repetition_penalty,
        presence_penalty=parameters.presence_penalty,
        frequency_penalty=parameters.frequency_penalty,
        seed=None if parameters.seed == RANDOM_SEED else parameters.seed,
        ignore_eos=parameters.ignore_eos,
        stop=stop,
        stop_token_sequences=stop_runs,
        include_stop_str_in_output=parameters.include_stop_str_in_output,
        print_eos_token=parameters.print_eos_token,
        skip_special_tokens=parameters.skip_special_tokens,
        penalty_scope="prompt_and_output" if parameters.input_penalty else "output",
        allowed_token_ids=list(parameters.allowed_token_ids or ()),
        banned_token_ids=_banned_ids(parameters.logit_bias, vocab_size),
        skip_prefix_cache=parameters.disable_prompt_cache,
        exponential_decay_length_penalty=_decay(parameters.exponential_decay_length_penalty),
        logprobs=0 if want_logprobs else None,
    )
    try:
        params.validate(vocab_size)  # the values as sent, before the greedy rule replaces any
    except ValueError as error:
        raise RequestError(f"parameters.{error}") from None
    temperature = params.temperature
    do_sample = parameters.do_sample
    if do_sample is None:  # LightLLM: the model's generation_config.json, else greedy
        do_sample = bool((generation_config or {}).get("do_sample", False))
    if not do_sample or (temperature is not None and temperature < GREEDY_TEMPERATURE_THRESHOLD):
        temperature = 0.0
    elif temperature is None:
        config = generation_config or {}
        if config.get("do_sample") is False:
            temperature = config.get("temperature", DEFAULT_TEMPERATURE)
    # LightLLM's min_new_tokens counts the ending token; the engine's counts those before it.
    min_new_tokens = max(params.min_new_tokens - 1, 0)
    return dataclasses.replace(params, temperature=temperature, min_new_tokens=min_new_tokens)


def _banned_ids(logit_bias: Mapping[str, Any] | None, vocab_size: int) -> list[int]:
    """The token ids of LightLLM's `logit_bias` keys (JSON keys are strings)."""
    ids = []
    for key in logit_bias or {}:
        # Far fewer digits than int() refuses (4,300); a token id has at most ten.
        if not re.fullmatch(r"\s*[0-9]{1,18}\s*", key):
            raise RequestError(f"parameters.logit_bias: keys must be token ids, got {key[:40]!r}")
        token_id = int(key)
        if token_id >= vocab_size:
            raise RequestError(
                f"parameters.logit_bias: token id {token_id} is outside [0, {vocab_size})"
            )
        ids.append(token_id)
    return ids


def _decay(value: list[int | float] | None) -> tuple[int, float] | None:
    """LightLLM's `[start, factor]` as SamplingParams takes it (its checks name a bad one)."""
    return None if value is None else tuple(value)  # type: ignore[return-value]
