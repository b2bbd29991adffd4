"""Command-line flags derived from a config dataclass: one field, one flag, same default.

`bool` fields become `--flag` switches; `list[...]` fields take several values; `X | None`
fields take an X. A field's `metadata` supplies `help` and any other argparse keyword (`choices`,
`nargs`, `type`). After parsing, the dataclass's `validate()` runs, and its ValueError becomes a
usage error that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _scalar_type(annotation: Any) -> Any:
    """int for `int`, `int | None` and `list[int]`; the same for str, float."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if origin in (list, Sequence):
        return _scalar_type(typing.get_args(annotation)[0])
    return annotation


def build_parser(config_class: type, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # A LightLLM flag Ocula lacks (--mode) must be refused by its name, not taken for a
        # prefix of another (--model_dir); no flag is accepted abbreviated.
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kwargs = dict(f.metadata)
        kwargs.setdefault("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        annotation = hints[f.name]
        if annotation is bool:
            parser.add_argument(f"--{f.name}", action="store_true", **kwargs)
            continue
        if typing.get_origin(_strip_none(annotation)) is list:
            kwargs.setdefault("nargs", "+")
        kwargs.setdefault("type", _scalar_type(annotation))
        parser.add_argument(f"--{f.name}", default=default, **kwargs)
    return parser


def _strip_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def parse_config(config_class: type[T], argv: Sequence[str] | None, description: str = "") -> T:
    """Parses `argv` into `config_class`; exits with a usage error for an unknown flag, a value
    of the wrong type, or a value `validate()` refuses."""
    parser = build_parser(config_class, description)
    namespace = parser.parse_args(argv)
    config = config_class(**vars(namespace))
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config
