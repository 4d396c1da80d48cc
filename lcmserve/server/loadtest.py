"""A bounded load test of a running lcmserve on loopback, and the batching comparison report.

Every request must end as an image (200) or a refusal with Retry-After (429): anything else
(a 5xx, a timeout, a lost request) is counted as an error. The load stops by itself after
``requests`` requests; only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

import httpx

from lcmserve.errors import InvalidInputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadResult:
    """Outcome counts and latencies of one load run."""

    requests: int
    concurrency: int
    wall_s: float
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms) or [0.0]
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 3),
            "statuses": self.statuses, "errors": self.errors, "images_per_s": round(self.ok / self.wall_s, 2),
            "p50_ms": round(pick(0.5), 1), "p90_ms": round(pick(0.9), 1), "p99_ms": round(pick(0.99), 1),
            "mean_ms": round(statistics.fmean(lat), 1),
        }


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise InvalidInputError(f"url: load tests target loopback only (127.0.0.0/8, ::1); got {host!r}", param="url")


async def run_load(url: str, *, requests: int = 500, concurrency: int = 32, payload: dict | None = None,
                   timeout_s: float = 120.0) -> LoadResult:
    """POST /generate ``requests`` times from ``concurrency`` workers; stops when all have ended."""
    check_loopback(url)
    payload = payload or {"prompt": "a red circle at the top left", "steps": 1}
    result = LoadResult(requests=requests, concurrency=concurrency, wall_s=0.0)
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                response = await client.post(url + "/generate", json={**payload, "seed": i})
                key = str(response.status_code)
                if response.status_code == 429 and "retry-after" not in response.headers:
                    key = "429-without-retry-after"
            except httpx.HTTPError:
                result.errors += 1
                continue
            result.statuses[key] = result.statuses.get(key, 0) + 1
            if response.status_code == 200:
                result.latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(*flags: str, log_path: Path | None = None, ready_timeout_s: float = 120.0):
    """`lcmserve serve` on a free loopback port (gRPC off); yields its base URL, then SIGTERMs it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "lcmserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", "0", *flags]
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server not ready within {ready_timeout_s} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def compare_batching(model: str, out: str | Path, *, requests: int = 500, concurrency: int = 32,
                     steps: int = 4, max_queue_rows: int = 64, batch_sizes: tuple[int, ...] = (1, 8)) -> dict:
    """The same load against max_batch_size=1 and larger batches; JSON, markdown and a plot."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in batch_sizes:
        flags = ("--model", model, "--max-batch-size", str(size), "--max-queue-rows", str(max(size, max_queue_rows)),
                 "--max-queue-delay-ms", "5")
        with local_server(*flags, log_path=out / f"server-batch{size}.log") as url:
            card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
            result = asyncio.run(run_load(url, requests=requests, concurrency=concurrency,
                                          payload={"prompt": "a red circle at the top left", "steps": steps}))
        engine = {k: card.get(k) for k in ("backend", "dtype", "attention", "backend_reason")}
        runs.append({"max_batch_size": size, "engine": engine, **result.summary()})
    import torch

    from lcmserve.engine.bench import environment

    env = environment(torch.device("cpu"))
    report = {"model": model, "steps": steps, "max_queue_rows": max_queue_rows, "runs": runs,
              "date": date.today().isoformat(), "machine": {"cpu": env["device"], "platform": platform.platform(),
                                                            "cpus": os.cpu_count(),
                                                            "cpu_bfloat16": env.get("cpu_bfloat16")},
              "versions": env["versions"]}
    (out / "server-load.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Model `{model}`, {steps} steps, {requests} requests at concurrency {concurrency}, queue "
             f"{max_queue_rows} rows, loopback, {report['date']}, {report['machine']['cpu']} "
             f"({os.cpu_count()} CPUs, bfloat16 instructions: {'yes' if report['machine']['cpu_bfloat16'] else 'no'}), "
             f"{platform.platform()}, torch {report['versions'].get('torch', '?')}.", "",
             "| max_batch_size | backend | 200 | 429 | other / errors | images/s | p50 ms | p90 ms | p99 ms | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        other = sum(v for k, v in r["statuses"].items() if k not in ("200", "429")) + r["errors"]
        engine = r["engine"]
        lines.append(f"| {r['max_batch_size']} | {engine['backend']}, {engine['dtype']}, {engine['attention']} | "
                     f"{r['statuses'].get('200', 0)} | {r['statuses'].get('429', 0)} | "
                     f"{other} | {r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['wall_s']} |")
    reasons = sorted({r["engine"]["backend_reason"] for r in runs if r["engine"].get("backend_reason")})
    lines += ["", *(f"Backend auto: {reason}." for reason in reasons)]
    if len(runs) > 1 and runs[0]["images_per_s"]:
        lines.append(f"Throughput with max_batch_size {runs[-1]['max_batch_size']}: "
                     f"{runs[-1]['images_per_s'] / runs[0]['images_per_s']:.2f}x max_batch_size "
                     f"{runs[0]['max_batch_size']}.")
    (out / "server-load.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out / "server-load.png")
    return report


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [str(r["max_batch_size"]) for r in runs]
    axes[0].bar(labels, [r["images_per_s"] for r in runs])
    axes[0].set(title="throughput", xlabel="max_batch_size", ylabel="images/s")
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        axes[1].plot(labels, [r[key] for r in runs], marker="o", label=key.removesuffix("_ms"))
    axes[1].set(title="latency of served requests", xlabel="max_batch_size", ylabel="ms")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
