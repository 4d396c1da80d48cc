"""A bounded loopback load over several LoRA adapters, with adapters added and removed while it runs.

Requests take turns over the adapters (one each, at scale 1); at given points of the run (after N
answers) an adapter is loaded (POST /v1/adapters) or removed (DELETE /v1/adapters/{name}) beside
the load. Nothing may be lost: every request sent gets exactly one answer, none hangs past its
timeout, none is a 5xx or a dropped connection, and every 200 holds the images asked for. A request
that names an adapter which is not loaded gets a 404 naming it, which is correct, not a loss; the
removed adapter stays in the turn so that its later requests show that.

What each request may get depends on when it was sent against the change of its adapter:

- an adapter loaded from the start and never removed: 200 (or 429 with Retry-After when the queue is full);
- the removed one: 200 before its DELETE was sent, 200 or 404 while the DELETE waits for the
  requests that use it, 404 once the DELETE has answered;
- the added one: 404 before its POST has answered, 200 after.

"Before the DELETE was sent" is measured at the client, so a request sent just before it may reach
the server after it: only the strict cases (404 after, 200 after the add) are checked as rules;
the others are counted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from lcmserve.errors import InvalidInputError, check_int
from lcmserve.server.loadtest import check_loopback, local_server

ACTIONS = ("add", "remove")
RANDOM = "random"
"""The path of an adapter to be made for the run: a random LoRA for the model's UNet."""
PROMPT = "a red circle at the top left"
MAX_LISTED = 20  # problems listed in the markdown report; the JSON has them all


@dataclass(frozen=True)
class AdapterChange:
    """One change to the loaded adapters, sent once ``after`` requests have been answered."""

    action: str
    """add (POST /v1/adapters with ``path``) or remove (DELETE /v1/adapters/{name})."""
    name: str
    after: int
    """Answers (of any status) before the change is sent, >= 0."""
    path: str | None = None
    """The LoRA to load, for add: a path the server can read, or a bundled LoRA's name."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise InvalidInputError.out_of_range("action", self.action, "add or remove")
        check_int("after", self.after, 0, 10_000_000)
        if (self.action == "add") != bool(self.path):
            raise InvalidInputError.out_of_range("path", self.path, "a LoRA path for add, none for remove")

    @classmethod
    def parse(cls, action: str, text: str, default_path: str | None = None) -> AdapterChange:
        """``NAME=PATH@N`` (add; ``NAME@N`` takes ``default_path``) or ``NAME@N`` (remove): the change, after N
        answers."""
        spec, sep, after = text.rpartition("@")
        name, _, path = spec.partition("=")
        if action == "add" and not path:
            path = default_path
        if not sep or not name or not after.strip().isdigit() or (action == "add") != bool(path):
            form = "NAME=PATH@N" if action == "add" else "NAME@N"
            raise InvalidInputError(f"{action}: {text!r} is not {form} (N: answers before the change)", param=action)
        return cls(action, name, int(after), path or None)


@dataclass
class Answer:
    """What one request got."""

    index: int
    adapter: str
    sent_s: float
    """Seconds from the start of the run to the request's sending."""
    latency_ms: float
    status: str
    """The HTTP status, or ``error:<exception>`` for a connection that ended without an answer."""
    images: int = 0
    message: str = ""


@dataclass
class ChangeRecord:
    """When a change was sent and what it got."""

    change: AdapterChange
    answered_before: int
    started_s: float
    ended_s: float
    status: str
    message: str = ""


@dataclass
class AdapterLoadResult:
    requests: int
    concurrency: int
    num_images: int
    initial: list[str]
    wall_s: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    changes: list[ChangeRecord] = field(default_factory=list)

    # 1. what each request got, against the change of its adapter
    def phase(self, answer: Answer) -> str:
        """initial, before / during / after (removed adapter) or before / after (added adapter)."""
        for record in self.changes:
            if record.change.name != answer.adapter:
                continue
            if record.change.action == "add":
                return "added, after" if answer.sent_s >= record.ended_s else "added, before"
            if answer.sent_s < record.started_s:
                return "removed, before"
            return "removed, after" if answer.sent_s >= record.ended_s else "removed, during"
        return "initial"

    def problems(self) -> list[str]:
        """Every way this run lost or mis-answered something; empty when it did not."""
        out = []
        indices = sorted(a.index for a in self.answers)
        if indices != list(range(self.requests)):
            out.append(f"{len(self.answers)} answers for {self.requests} requests (each must get exactly one)")
        for a in self.answers:
            phase, status = self.phase(a), a.status
            where = f"request {a.index} ({a.adapter}, {phase})"
            if status.startswith("error:") or status.startswith("5"):
                out.append(f"{where}: {status} {a.message[:200]}")
            elif status == "200" and a.images != self.num_images:
                out.append(f"{where}: 200 with {a.images} images, not {self.num_images}")
            elif status == "404" and (phase in ("initial", "added, after") or repr(a.adapter) not in a.message):
                out.append(f"{where}: 404 {a.message[:200]}")
            elif status == "200" and phase == "removed, after":
                out.append(f"{where}: 200 after the removal had answered")
            elif status not in ("200", "404", "429"):
                out.append(f"{where}: {status} {a.message[:200]}")
        for record in self.changes:
            want = "201" if record.change.action == "add" else "204"
            if record.status != want:
                out.append(f"{record.change.action} {record.change.name}: {record.status} (want {want}) "
                           f"{record.message[:200]}")
        return out

    # 2. the summary people read
    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.answers:
            counts[a.status] = counts.get(a.status, 0) + 1
        return dict(sorted(counts.items()))

    def by_phase(self) -> dict[str, dict[str, int]]:
        """Status counts per (adapter, phase)."""
        table: dict[str, dict[str, int]] = {}
        for a in self.answers:
            row = table.setdefault(f"{a.adapter} ({self.phase(a)})", {})
            row[a.status] = row.get(a.status, 0) + 1
        return dict(sorted(table.items()))

    def summary(self) -> dict:
        served = sorted(a.latency_ms for a in self.answers if a.status == "200") or [0.0]
        pick = lambda q: served[min(len(served) - 1, int(q * len(served)))]  # noqa: E731
        return {
            "requests": self.requests, "concurrency": self.concurrency, "num_images": self.num_images,
            "initial_adapters": self.initial, "wall_s": round(self.wall_s, 3), "statuses": self.statuses(),
            "by_phase": self.by_phase(), "images_per_s": round(self.statuses().get("200", 0) * self.num_images
                                                               / max(self.wall_s, 1e-9), 3),
            "p50_ms": round(pick(0.5), 1), "p95_ms": round(pick(0.95), 1), "max_ms": round(served[-1], 1),
            "mean_ms": round(statistics.fmean(served), 1),
            "changes": [{**asdict(r.change), "answered_before": r.answered_before, "started_s": round(r.started_s, 3),
                         "took_ms": round((r.ended_s - r.started_s) * 1000, 1), "status": r.status}
                        for r in self.changes],
            "problems": self.problems(),
        }


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


async def run_adapter_load(url: str, adapters: list[str], changes: list[AdapterChange], *, requests: int = 200,
                           concurrency: int = 16, payload: dict | None = None, headers: dict | None = None,
                           timeout_s: float = 300.0) -> AdapterLoadResult:
    """POST /generate ``requests`` times from ``concurrency`` workers, taking turns over ``adapters`` (and each
    added one once its POST has answered), while ``changes`` are sent; stops when all have ended."""
    check_loopback(url)
    check_int("requests", requests, 1, 10_000_000)
    check_int("concurrency", concurrency, 1, 10_000)
    if not adapters:
        raise InvalidInputError.out_of_range("adapters", adapters, "at least one adapter name")
    for change in changes:
        if change.after >= requests:
            raise InvalidInputError.out_of_range(f"{change.action}", change.after,
                                                 f"an answer count below requests={requests}")
    payload = payload or {"prompt": PROMPT, "steps": 1}
    result = AdapterLoadResult(requests=requests, concurrency=concurrency, num_images=payload.get("num_images", 1),
                               initial=list(adapters))
    turn = list(adapters)  # the removed adapter stays in the turn: its later requests must get 404
    counter = iter(range(requests))
    answered = asyncio.Condition()
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            name = turn[i % len(turn)]
            sent = time.perf_counter()
            answer = Answer(i, name, sent - t0, 0.0, "")
            try:
                response = await client.post(url + "/generate", json={**payload, "seed": i, "adapters": {name: 1.0}})
                answer.status = str(response.status_code)
                if response.status_code == 200:
                    answer.images = len(response.json().get("images", []))
                else:
                    answer.message = _message(response)
                    if response.status_code == 429 and "retry-after" not in response.headers:
                        answer.status = "429-without-retry-after"
            except httpx.HTTPError as exc:  # a dropped connection or a timeout: a lost request
                answer.status, answer.message = f"error:{type(exc).__name__}", str(exc)
            answer.latency_ms = (time.perf_counter() - sent) * 1000
            async with answered:
                result.answers.append(answer)
                answered.notify_all()

    async def change_at(client: httpx.AsyncClient, change: AdapterChange) -> None:
        async with answered:
            await answered.wait_for(lambda: len(result.answers) >= change.after)
            before = len(result.answers)
        started = time.perf_counter()
        try:
            if change.action == "add":
                response = await client.post(url + "/v1/adapters", json={"name": change.name, "path": change.path})
            else:
                response = await client.delete(url + f"/v1/adapters/{change.name}")
            status, message = str(response.status_code), "" if response.is_success else _message(response)
        except httpx.HTTPError as exc:
            status, message = f"error:{type(exc).__name__}", str(exc)
        ended = time.perf_counter()
        result.changes.append(ChangeRecord(change, before, started - t0, ended - t0, status, message))
        if change.action == "add" and status == "201":
            turn.append(change.name)

    limits = httpx.Limits(max_connections=concurrency + len(changes))
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)),
                             *(change_at(client, change) for change in changes))
    result.wall_s = time.perf_counter() - t0
    result.changes.sort(key=lambda r: r.started_s)
    return result


def make_random_adapters(model: str, names: list[str], out: Path, rank: int = 4) -> dict[str, str]:
    """A random LoRA of ``rank`` per name for ``model``'s UNet (as ``lcmserve bench adapters`` makes them): stand-ins
    whose images mean nothing, read through the same path as a user's file."""
    from lcmserve.engine.bench_adapters import make_adapter
    from lcmserve.models import load_model

    unet = load_model(model, device="cpu", dtype="float32").unet
    return {name: str(make_adapter(unet, out / name, rank, seed=100 + i)) for i, name in enumerate(names)}


def check_adapters_under_load(model: str, adapters: dict[str, str | None], changes: list[AdapterChange], out: Path,
                              *, name: str = "adapters-load", requests: int = 200, concurrency: int = 16,
                              steps: int = 4, max_batch_size: int = 8, rank: int = 4, prompt: str = PROMPT,
                              command: str = "", server_log: Path | None = None) -> dict:
    """Serve ``model`` on loopback with ``adapters`` (name -> path; None: a random LoRA), run the load with
    ``changes`` (an add without a path gets a random LoRA too), write ``name``.json and ``name``.md to ``out``."""
    import torch

    from lcmserve.engine.bench import environment

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [n for n, path in adapters.items() if path is None]
        wanted += [c.name for c in changes if c.action == "add" and c.path == RANDOM]
        made = make_random_adapters(model, wanted, Path(tmp), rank) if wanted else {}
        paths = {n: path or made[n] for n, path in adapters.items()}
        changes = [replace(c, path=made[c.name]) if c.path == RANDOM else c for c in changes]
        flags = ("--model", model, "--max-batch-size", str(max_batch_size), "--max-queue-delay-ms", "5",
                 "--warmup-steps", str(steps), *[a for n, path in paths.items() for a in ("--adapter", f"{n}={path}")])
        with local_server(*flags, log_path=server_log) as url:
            result = asyncio.run(run_adapter_load(url, list(paths), changes, requests=requests, concurrency=concurrency,
                                                  payload={"prompt": prompt, "steps": steps}))
    summary = result.summary()
    for change in summary["changes"]:  # the temporary folder is gone; say what it held
        if change["path"] and change["path"].startswith(tmp):
            change["path"] = f"random rank-{rank} LoRA"
    env = environment(torch.device("cpu"))
    report = {"model": model, "steps": steps, "max_batch_size": max_batch_size, "rank": rank, "prompt": prompt,
              "adapters": {n: path or f"random rank-{rank} LoRA" for n, path in adapters.items()},
              "command": command, "environment": env, **summary}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    context = [f"{env['device']}, {env['cpu_count']} CPUs, torch {torch.__version__}, {env['date'][:10]}; "
               f"model `{model}`, {steps} steps, `--max-batch-size {max_batch_size}`, backend torch, loopback.",
               "", f"Command: `{command}`" if command else ""]
    if made:
        context += ["", f"The adapters {', '.join(made)} are random rank-{rank} LoRAs (peft's random init on the "
                    "attention and feed-forward layers, scale 1), made for the run: they load and cost what a real "
                    "LoRA of that rank does, and their images mean nothing."]
    (out / f"{name}.md").write_text(markdown(summary, title=f"Adapters added and removed under load: {model}",
                                             context=context))
    return report


def markdown(summary: dict, *, title: str, context: list[str]) -> str:
    """The run as a results page: ``context`` lines (machine, command), statuses, phases, latency, changes."""
    statuses = summary["statuses"]
    lines = [f"# {title}", "", *context, "",
             f"{summary['requests']} requests at concurrency {summary['concurrency']} over the adapters "
             f"{', '.join(summary['initial_adapters'])} (one per request, in turn), {summary['num_images']} image(s) "
             f"each; wall {summary['wall_s']} s, {summary['images_per_s']} images/s.", "",
             "| status | requests |", "|---|---|", *[f"| {k} | {v} |" for k, v in statuses.items()],
             f"| total | {sum(statuses.values())} |", "",
             "Changes, sent beside the load:", "", "| change | after answers | sent at s | took ms | status |",
             "|---|---|---|---|---|"]
    for c in summary["changes"]:
        what = f"add {c['name']} ({c['path']})" if c["action"] == "add" else f"remove {c['name']}"
        lines.append(f"| {what} | {c['answered_before']} | {c['started_s']} | {c['took_ms']} | {c['status']} |")
    lines += ["", "By adapter and when the request was sent against its adapter's change:", "",
              "| adapter (when) | statuses |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{s}: {n}' for s, n in v.items())} |" for k, v in summary["by_phase"].items()]
    lines += ["", f"Latency of the 200s: p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
              f"max {summary['max_ms']} ms, mean {summary['mean_ms']} ms.", "",
              "Problems (lost, 5xx, dropped, wrong image count, wrong 404/200): "
              + ("none." if not summary["problems"] else f"{len(summary['problems'])}."),
              *[f"- {p}" for p in summary["problems"][:MAX_LISTED]]]
    if len(summary["problems"]) > MAX_LISTED:
        lines.append(f"- and {len(summary['problems']) - MAX_LISTED} more (all in the JSON)")
    return "\n".join(lines) + "\n"


__all__ = ["AdapterChange", "AdapterLoadResult", "Answer", "ChangeRecord", "check_adapters_under_load",
           "make_random_adapters", "markdown", "run_adapter_load"]
