"""Adapters added and removed under a bounded loopback load: a real server process on 127.0.0.1 serving the tiny
model with three adapters, 200 requests at concurrency 16; nothing lost, no 5xx, clean 404s for a removed name."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_lora
from lcmserve.errors import InvalidInputError
from lcmserve.server.adapter_load import AdapterChange, Answer, AdapterLoadResult, ChangeRecord, run_adapter_load
from lcmserve.server.loadtest import local_server

REQUESTS, CONCURRENCY = 200, 16


@pytest.fixture(scope="module")
def loras(lcm_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("load-loras")
    return {name: str(make_lora(lcm_sd_dir, root / name, seed=40 + i)) for i, name in enumerate("abcd")}


def test_adding_and_removing_adapters_under_load_loses_nothing(lcm_sd_dir, loras, tmp_path):
    flags = ("--model", str(lcm_sd_dir), "--device", "cpu", "--dtype", "float32", "--warmup-steps", "1",
             "--max-batch-size", "8", "--max-queue-delay-ms", "5",
             *[arg for name in "abc" for arg in ("--adapter", f"{name}={loras[name]}")])
    changes = [AdapterChange("add", "d", after=50, path=loras["d"]), AdapterChange("remove", "b", after=90)]
    log = tmp_path / "server.log"
    with local_server(*flags, log_path=log) as url:
        result = asyncio.run(run_adapter_load(url, ["a", "b", "c"], changes, requests=REQUESTS,
                                              concurrency=CONCURRENCY, payload={"prompt": "a red circle", "steps": 1},
                                              timeout_s=60))
    summary = result.summary()
    assert result.problems() == [], (result.problems(), log.read_text()[-3000:])
    # every request answered once, by an image or a clean 404; no 5xx, no dropped connection
    assert sum(summary["statuses"].values()) == REQUESTS
    assert set(summary["statuses"]) <= {"200", "404"}, summary["statuses"]
    assert [(c["action"], c["name"], c["status"]) for c in summary["changes"]] == [("add", "d", "201"),
                                                                                 ("remove", "b", "204")]
    phases = summary["by_phase"]
    # after its removal answered, b's requests are 404s naming it; after its load answered, d's are images
    assert phases["b (removed, after)"].get("404", 0) > 0 and set(phases["b (removed, after)"]) == {"404"}, phases
    assert phases["d (added, after)"].get("200", 0) > 0 and set(phases["d (added, after)"]) == {"200"}, phases
    assert set(phases["a (initial)"]) == set(phases["c (initial)"]) == {"200"}, phases
    assert all("'b'" in a.message for a in result.answers if a.adapter == "b" and a.status == "404")


def test_the_verdict_catches_what_would_be_a_loss():
    change = AdapterChange("remove", "b", after=1)
    result = AdapterLoadResult(requests=4, concurrency=2, num_images=1, initial=["a", "b"],
                               changes=[ChangeRecord(change, 1, started_s=1.0, ended_s=2.0, status="204")])
    result.answers = [Answer(0, "a", 0.1, 5.0, "200", images=1),
                      Answer(1, "b", 2.5, 5.0, "500", message="the engine failed on a batch"),
                      Answer(2, "b", 3.0, 5.0, "200", images=1)]
    problems = "\n".join(result.problems())
    assert "3 answers for 4 requests" in problems
    assert "request 1 (b, removed, after): 500" in problems
    assert "request 2 (b, removed, after): 200 after the removal" in problems


def test_changes_parse_and_refuse_malformed_specs():
    assert AdapterChange.parse("add", "ink=/x/ink@40") == AdapterChange("add", "ink", 40, "/x/ink")
    assert AdapterChange.parse("remove", "ink@90") == AdapterChange("remove", "ink", 90)
    assert AdapterChange.parse("add", "ink@40", default_path="random") == AdapterChange("add", "ink", 40, "random")
    for action, text in (("add", "ink@40"), ("add", "ink=/x"), ("remove", "ink=/x@3"), ("remove", "@3")):
        with pytest.raises(InvalidInputError):
            AdapterChange.parse(action, text)
