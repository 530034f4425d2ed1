"""Session-wide test setup."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def nanollm_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh cache for what nanollm builds once (the embedded tokenizer): tests never see a user's cache."""
    os.environ["NANOLLM_CACHE"] = str(tmp_path_factory.mktemp("nanollm-cache"))
