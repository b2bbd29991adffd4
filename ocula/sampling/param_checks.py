"""The limits of `SamplingParams` and their checks: `validate_params` names the first field out
of range (`SamplingParams.validate` calls it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ocula.sampling.params import SamplingParams

MAX_LOGPROBS = 20
# All stop strings of a request together, in characters: far above any real use, and it bounds
# the matcher's tables (`engine/stop_strings.py`).
MAX_STOP_CHARS = 16384
# Stop strings per request (OpenAI takes 4): each one costs the matcher work per output character.
MAX_STOP_STRINGS = 64
FLOAT32_MAX = 3.4028234663852886e38
# Far beyond use (penalties near 1), and it keeps a logit of 1e4 finite in float32 either way.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
# OpenAI's lower bound; no upper one in LightLLM, and 1e6 x any count stays finite in float32
# (the OpenAI routes keep OpenAI's [-2, 2]).
PRESENCE_FREQUENCY_RANGE = (-2.0, 1e6)
# OpenAI's bounds: a bias of -100 or 100 in effect bans or forces its token.
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
# Cap of the EOS logit's relative gain under exponential_decay_length_penalty: it keeps a
# factor > 1 far into a long output from overflowing float32 (the EOS is then certain anyway).
MAX_EOS_DECAY_GAIN = 1e6
# Each row's allowed ids are copied to the device every step.
MAX_ALLOWED_TOKEN_IDS = 16384
# Stop token ids of one request (the engine keeps a set of them per sequence).
MAX_STOP_TOKEN_IDS = 1024
# Token ids in all the id lists of one request (allowed, banned, stop, stop runs, logit_bias),
# times its n: every sequence carries its own copy to the engine process, so a small body with
# a large n must not turn into gigabytes there.
MAX_TOKEN_ID_ENTRIES = 1 << 20
# Which tokens the penalties count (see SamplingParams).
PENALTY_SCOPES = ("vllm", "output", "prompt_and_output")
_SEED_MIN = -(2**63)  # torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]
_SEED_MAX = 2**64 - 1


def validate_params(params: SamplingParams, vocab_size: int | None = None) -> None:
    """Raises ValueError naming the first field that is out of range.

    Unresolved knobs (None) are accepted; resolved values are checked. With `vocab_size`,
    the token ids of `logit_bias`, `allowed_token_ids` and `stop_token_sequences` must be below
    it.
    """
    _check_int("n", params.n)
    if params.n < 1:
        raise ValueError(f"n must be at least 1, got {params.n}")
    _check_int("max_new_tokens", params.max_new_tokens)
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    _check_int("min_new_tokens", params.min_new_tokens)
    if params.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be at least 0, got {params.min_new_tokens}")
    if params.min_new_tokens > params.max_new_tokens:
        raise ValueError(
            f"min_new_tokens ({params.min_new_tokens}) must not exceed "
            f"max_new_tokens ({params.max_new_tokens})"
        )
    if params.temperature is not None:
        _check_number("temperature", params.temperature)
        if params.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {params.temperature}")
    if params.top_p is not None:
        _check_number("top_p", params.top_p)
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k is not None:
        _check_int("top_k", params.top_k)
        if params.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {params.top_k}")
    if params.min_p is not None:
        _check_number("min_p", params.min_p)
        if not 0 <= params.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    if params.repetition_penalty is not None:
        _check_number("repetition_penalty", params.repetition_penalty)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= params.repetition_penalty <= high:
            raise ValueError(
                f"repetition_penalty must be in [{low:g}, {high:g}], "
                f"got {params.repetition_penalty}"
            )
    low, high = PRESENCE_FREQUENCY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        _check_number(name, value)
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    if params.seed is not None:
        _check_int("seed", params.seed)
        if not _SEED_MIN <= params.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {params.seed}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None:
            _check_int(name, value)
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
    if not isinstance(params.stop, list) or not all(isinstance(s, str) for s in params.stop):
        raise ValueError(f"stop must be a string or a list of strings, got {params.stop!r}")
    if any(s == "" for s in params.stop):
        raise ValueError("stop strings must not be empty")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise ValueError(
            f"stop holds {len(params.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    if sum(len(s) for s in params.stop) > MAX_STOP_CHARS:
        raise ValueError(
            f"stop strings may hold {MAX_STOP_CHARS} characters in all, "
            f"got {sum(len(s) for s in params.stop)}"
        )
    _check_id_list("stop_token_ids", params.stop_token_ids, MAX_STOP_TOKEN_IDS, vocab_size)
    _validate_stop_token_sequences(params, vocab_size)
    _validate_logit_bias(params, vocab_size)
    _check_id_list("allowed_token_ids", params.allowed_token_ids, MAX_ALLOWED_TOKEN_IDS, vocab_size)
    _validate_banned_token_ids(params, vocab_size)
    entries = token_id_entries(params) * params.n
    if entries > MAX_TOKEN_ID_ENTRIES:
        raise ValueError(
            f"n ({params.n}) x the token ids in allowed_token_ids, stop ids, stop sequences and "
            f"logit_bias ({token_id_entries(params)}) is {entries}, over the limit of "
            f"{MAX_TOKEN_ID_ENTRIES}: send fewer ids or a smaller n"
        )
    if params.exponential_decay_length_penalty is not None:
        decay = params.exponential_decay_length_penalty
        if not isinstance(decay, (tuple, list)) or len(decay) != 2:
            raise ValueError(
                f"exponential_decay_length_penalty must be [start, factor], got {decay!r}"
            )
        _check_int("exponential_decay_length_penalty's start", decay[0])
        _check_number("exponential_decay_length_penalty's factor", decay[1])
        if decay[0] < 0 or not decay[1] > 0:
            raise ValueError(
                "exponential_decay_length_penalty needs a start >= 0 and a factor > 0, "
                f"got {list(decay)}"
            )
    if params.penalty_scope not in PENALTY_SCOPES:
        raise ValueError(
            f"penalty_scope must be one of {', '.join(PENALTY_SCOPES)}, got "
            f"{params.penalty_scope!r}"
        )


def _validate_stop_token_sequences(params: SamplingParams, vocab_size: int | None) -> None:
    sequences = params.stop_token_sequences
    if not isinstance(sequences, list) or not all(
        isinstance(sequence, list) and sequence for sequence in sequences
    ):
        raise ValueError(
            f"stop_token_sequences must be non-empty lists of token ids, got {sequences!r}"
        )
    if len(sequences) > MAX_STOP_STRINGS or sum(map(len, sequences)) > MAX_STOP_CHARS:
        raise ValueError(
            f"stop_token_sequences: at most {MAX_STOP_STRINGS} sequences and "
            f"{MAX_STOP_CHARS} token ids in all"
        )
    bound = vocab_size if vocab_size is not None else "the vocabulary size"
    for sequence in sequences:
        for token_id in sequence:
            _check_int("stop_token_sequences", token_id)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise ValueError(
                    f"stop_token_sequences: token id {token_id} is outside [0, {bound})"
                )


def _check_id_list(name: str, ids: Any, limit: int, vocab_size: int | None) -> None:
    """A list of at most `limit` token ids, each in [0, vocab_size)."""
    if not isinstance(ids, list):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    if len(ids) > limit:
        raise ValueError(f"{name} holds {len(ids)} ids; at most {limit} are allowed")
    bound = vocab_size if vocab_size is not None else "the vocabulary size"
    for token_id in ids:
        _check_int(name, token_id)
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise ValueError(f"{name}: token id {token_id} is outside [0, {bound})")


def token_id_entries(params: SamplingParams) -> int:
    """Token ids in the request's id lists, each sequence's copy counted once."""
    return (
        len(params.allowed_token_ids)
        + len(params.banned_token_ids)
        + len(params.stop_token_ids)
        + sum(len(sequence) for sequence in params.stop_token_sequences)
        + len(params.logit_bias)
    )


def _validate_banned_token_ids(params: SamplingParams, vocab_size: int | None) -> None:
    banned = params.banned_token_ids
    _check_id_list("banned_token_ids", banned, MAX_LOGIT_BIAS_TOKENS, vocab_size)
    unique = set(banned)
    if vocab_size is not None and len(unique) >= vocab_size:
        raise ValueError("banned_token_ids bans every token of the vocabulary")
    if params.allowed_token_ids and set(params.allowed_token_ids) <= unique:
        raise ValueError("banned_token_ids bans every token of allowed_token_ids")


def _validate_logit_bias(params: SamplingParams, vocab_size: int | None) -> None:
    if not isinstance(params.logit_bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {params.logit_bias!r}")
    if len(params.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(
            f"logit_bias holds {len(params.logit_bias)} tokens; at most "
            f"{MAX_LOGIT_BIAS_TOKENS} are allowed"
        )
    for token_id, bias in params.logit_bias.items():
        _check_int("a logit_bias token id", token_id)
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            bound = vocab_size if vocab_size is not None else "the vocabulary size"
            raise ValueError(f"logit_bias token id {token_id} is outside [0, {bound})")
        _check_number("logit_bias", bias)
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise ValueError(
                f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], "
                f"got {bias} for token {token_id}"
            )


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN compares unequal to itself and would pass every range check
        raise ValueError(f"{name} must not be NaN")
    # Every knob becomes a float32 on the device: past its range (JSON's 1e309 is inf already)
    # a value turns into inf there, and inf / inf into NaN logits.
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{name} must be finite (at most {FLOAT32_MAX:.3g} in size), got {value}")
