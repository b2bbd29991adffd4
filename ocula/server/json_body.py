"""Request bodies read as LightLLM reads them: JSON whatever the Content-Type, then validated
against a pydantic model."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ocula.server.async_engine import RequestError

Body = TypeVar("Body", bound=BaseModel)

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def holds_lone_surrogate(data: object) -> bool:
    """Whether any string in parsed JSON (keys included) holds an unpaired surrogate."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


async def read_body(request: Request, model: type[Body]) -> Body:
    """The body parsed as JSON and validated as `model`, whatever its Content-Type: LightLLM
    reads every body as JSON, and `curl -d` sends application/x-www-form-urlencoded."""
    raw = await request.body()
    try:
        # Strict UTF-8 first (a leading BOM allowed): json.loads(bytes) would also take UTF-16
        # bodies and encoded surrogates (surrogatepass), which no tokenizer can encode.
        data = json.loads(raw.decode("utf-8-sig"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise RequestError("the body is not valid JSON: it is nested too deeply") from None
    # json.loads turns an unpaired \ud800-\udfff escape into a lone surrogate, which no
    # tokenizer can encode (the OpenAI routes' parser refuses them too).
    if _SURROGATE_ESCAPE.search(raw) and holds_lone_surrogate(data):
        raise RequestError(
            "the body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
            "which is not valid Unicode text"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
