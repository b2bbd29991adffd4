"""The converted default model (SmolLM2-135M-Instruct), converted at most once per test session.

Use it from a test module by importing the fixture:

    from tests.helpers.default_model import default_model_folder  # noqa: F401

`default_model_folder` is a session fixture returning the converted folder. It lives under the
session's base temp dir, so if several modules import the fixture (pytest then keeps one instance
per module), the later instances find the finished folder and reuse it instead of converting.
Tests must treat the folder as read-only.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocula.default_model import default_model_dir


@pytest.fixture(scope="session")
def default_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache_root = tmp_path_factory.getbasetemp() / "ocula-default-model-cache"
    yield default_model_dir(cache_root)
    # Half a gigabyte per session; pytest would otherwise keep the last three sessions' copies.
    shutil.rmtree(cache_root, ignore_errors=True)
