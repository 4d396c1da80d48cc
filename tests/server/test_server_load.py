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


def test_compare_batching_reports_the_machine_and_the_engine_each_server_ran(tmp_path):
    from lcmserve.server.loadtest import compare_batching

    report = compare_batching("preset:tiny-sd", tmp_path, requests=12, concurrency=4, steps=1, max_queue_rows=8,
                              batch_sizes=(1, 4))
    assert [r["max_batch_size"] for r in report["runs"]] == [1, 4]
    assert all(r["statuses"].get("200") == 12 and r["engine"]["backend"] == "torch" for r in report["runs"])
    assert report["machine"]["cpu"] and "torch" in report["versions"]
    text = (tmp_path / "server-load.md").read_text()
    assert report["machine"]["cpu"] in text and "| 4 | torch, " in text and "max_batch_size 1." in text
    assert (tmp_path / "server-load.png").is_file()
