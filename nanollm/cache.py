"""nanollm's cache folder: what it builds once and keeps between processes (the embedded tokenizer, analyses)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where nanollm keeps what it builds once: $NANOLLM_CACHE, else $XDG_CACHE_HOME/nanollm, else ~/.cache/nanollm."""
    if os.environ.get("NANOLLM_CACHE"):
        return Path(os.environ["NANOLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanollm"
