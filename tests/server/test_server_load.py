"""Load against a real server on loopback: every request ends as an image or a 429, none lost."""

import asyncio

import pytest

from lcmserve.errors import InvalidInputError
from lcmserve.server.loadtest import check_loopback, local_server, run_load


def test_500_requests_at_concurrency_32_with_a_small_queue(tmp_path):
    flags = ("--model", "preset:tiny-sd", "--max-batch-size", "8", "--max-queue-rows", "16",
             "--max-queue-delay-ms", "5")
    with local_server(*flags, log_path=tmp_path / "server.log") as url:
        result = asyncio.run(run_load(url, requests=500, concurrency=32,
                                      payload={"prompt": "a red circle", "steps": 1}))
    assert result.errors == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert set(result.statuses) <= {"200", "429"}, result.statuses
    assert sum(result.statuses.values()) == 500
    assert result.ok > 0


def test_load_only_targets_loopback():
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(InvalidInputError, match="loopback only"):
        check_loopback("http://10.0.0.5:8000")
