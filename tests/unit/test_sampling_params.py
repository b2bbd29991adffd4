"""SamplingParams: validation messages and resolution of defaults from a generation config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ocula.sampling import params as params_module
from ocula.sampling.params import SamplingParams


def test_defaults_are_valid() -> None:
    params = SamplingParams()
    params.validate()
    assert params.n == 1 and params.max_new_tokens == 16 and params.min_new_tokens == 0
    assert params.temperature is None and params.top_k is None
    assert params.stop == [] and params.stop_token_ids == [] and params.logprobs is None


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 20, "max_new_tokens": 10}, "min_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # 0 in float32
        ({"repetition_penalty": 1e39}, "repetition_penalty"),
        ({"temperature": 1e300}, "temperature"),  # inf in float32
        ({"temperature": 10**400}, "temperature"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["a" * 10_000, "b" * 6_385]}, "stop"),  # 16,385 characters in all
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2e6}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"n": True}, "n"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"banned_token_ids": [-1]}, "banned_token_ids"),
        ({"banned_token_ids": list(range(1025))}, "banned_token_ids"),
        ({"allowed_token_ids": [3, 4], "banned_token_ids": [4, 3]}, "allowed_token_ids"),
        # Every sequence carries its own copy of the id lists: n x ids is bounded.
        ({"n": 128, "allowed_token_ids": list(range(8193))}, "smaller n"),
    ],
)
def test_validate_names_the_bad_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**kwargs).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},  # 0 also means off
        {"top_k": 1},
        {"temperature": 0.0},
        {"top_p": 1.0, "min_p": 1.0, "logprobs": 0},
        {"logprobs": 20, "presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"min_new_tokens": 16, "max_new_tokens": 16},
        {"seed": -5},
        {"top_k": 2**63},  # past int64: keeps every token (the batch clamps it)
        {"stop": ["a" * 10_000, "b" * 6_384]},  # 16,384 characters in all
        {"stop": [str(i) for i in range(64)], "repetition_penalty": 1e6, "temperature": 1e38},
        {"logit_bias": {0: -100, 2**40: 100.0}},  # no vocabulary given: any id >= 0
        {"logit_bias": {i: 0.5 for i in range(1024)}},
    ],
)
def test_validate_accepts_boundaries(kwargs: dict) -> None:
    SamplingParams(**kwargs).validate()


def test_single_stop_string_becomes_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]


def test_global_fallbacks_without_generation_config() -> None:
    for config in (None, {}):
        params = SamplingParams().with_model_defaults(config)
        assert params.temperature == 1.0
        assert params.top_p == 1.0
        assert params.top_k == -1
        assert params.min_p == 0.0
        assert params.repetition_penalty == 1.0
        params.validate()


def test_generation_config_fills_only_unset_fields() -> None:
    config = {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "max_new_tokens": 999,  # not a sampling knob: ignored
    }
    params = SamplingParams(top_p=0.5, seed=3)
    resolved = params.with_model_defaults(config)
    assert resolved.temperature == 0.7
    assert resolved.top_p == 0.5  # the user's value wins
    assert resolved.top_k == 20
    assert resolved.min_p == 0.05
    assert resolved.repetition_penalty == 1.05
    assert resolved.max_new_tokens == 16 and resolved.seed == 3
    assert params.temperature is None  # the original is untouched


def test_do_sample_false_means_greedy_unless_the_user_sets_temperature() -> None:
    config = {"do_sample": False, "temperature": 0.6, "top_p": 0.9}
    resolved = SamplingParams().with_model_defaults(config)
    assert resolved.temperature == 0.0 and resolved.is_greedy
    assert SamplingParams(temperature=0.8).with_model_defaults(config).temperature == 0.8


def test_absent_do_sample_uses_the_config_temperature() -> None:
    assert SamplingParams().with_model_defaults({"temperature": 0.6}).temperature == 0.6


def test_null_values_and_top_k_zero_fall_back() -> None:
    resolved = SamplingParams().with_model_defaults({"top_k": 0, "top_p": None})
    assert resolved.top_k == -1
    assert resolved.top_p == 1.0
    assert SamplingParams(top_k=0).with_model_defaults({"top_k": 40}).top_k == -1


def test_logit_bias_ids_are_checked_against_the_vocabulary() -> None:
    SamplingParams(logit_bias={99: 1.0}).validate(vocab_size=100)
    with pytest.raises(ValueError, match=r"logit_bias token id 100 is outside \[0, 100\)"):
        SamplingParams(logit_bias={100: 1.0}).validate(vocab_size=100)


def test_copy_does_not_share_lists() -> None:
    params = SamplingParams(stop=["a"], stop_token_ids=[7], logit_bias={3: 1.0})
    resolved = params.with_model_defaults({})
    resolved.stop.append("b")
    resolved.stop_token_ids.append(8)
    resolved.logit_bias[4] = 2.0
    assert params.stop == ["a"] and params.stop_token_ids == [7] and params.logit_bias == {3: 1.0}


def test_module_needs_no_torch() -> None:
    # Loads the file on its own (package __init__ files may import torch for other reasons).
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        f"spec = importlib.util.spec_from_file_location('params', {str(params_module.__file__)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['params'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.SamplingParams(temperature=0.5).validate()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_banned_ids_must_leave_a_token_of_the_vocabulary() -> None:
    SamplingParams(banned_token_ids=list(range(9))).validate(vocab_size=10)
    with pytest.raises(ValueError, match="every token of the vocabulary"):
        SamplingParams(banned_token_ids=[*range(10), 3]).validate(vocab_size=10)
