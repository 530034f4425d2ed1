"""Session-wide test setup."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def nanollm_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh cache for what nanollm builds once (the embedded tokenizer): tests never see a user's cache."""
    os.environ["NANOLLM_CACHE"] = str(tmp_path_factory.mktemp("nanollm-cache"))


def run_group(command: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, killed whole when it ends or times out: a launcher's worker left
    behind (one rank of a run that failed) would otherwise keep the rendezvous port and hang every later launch."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
