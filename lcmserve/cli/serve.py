"""Serve a model: ``serve`` (REST, gRPC, /metrics), ``loadtest`` (batching under load, on loopback) and
``loadtest-lora`` (adapters added and removed under load, on loopback)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from lcmserve.errors import InvalidInputError


def add(sub) -> None:
    _add_serve(sub)
    _add_loadtest(sub)
    _add_loadtest_adapters(sub)


def cmd_serve(args: argparse.Namespace) -> int:
    from lcmserve.server.app import serve
    from lcmserve.server.config import ServerConfig

    return serve(ServerConfig.load(args, os.environ))


def _add_serve(sub) -> None:
    from lcmserve.server.config import add_arguments

    sv = sub.add_parser("serve", help="serve the model over REST (OpenAI-compatible too), gRPC and /metrics",
                        description="Every flag also reads LCMSERVE_<FLAG> from the environment; flags win.")
    add_arguments(sv)
    sv.set_defaults(func=cmd_serve)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from lcmserve.server.loadtest import compare_batching

    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            raise InvalidInputError.out_of_range(name, getattr(args, name), "an integer >= 1")
    compare_batching(args.model, args.output, requests=args.requests, concurrency=args.concurrency,
                     steps=args.steps, max_queue_rows=args.max_queue_rows)
    print((Path(args.output) / "server-load.md").read_text())
    return 0


def _add_loadtest(sub) -> None:
    lt = sub.add_parser("loadtest", help="bounded loopback load: max_batch_size 1 vs 8 (JSON, markdown, plot)")
    lt.add_argument("--model", default="preset:tiny-sd", help="model the local servers load")
    lt.add_argument("--requests", type=int, default=500)
    lt.add_argument("--concurrency", type=int, default=32)
    lt.add_argument("--steps", type=int, default=4)
    lt.add_argument("--max-queue-rows", type=int, default=64)
    lt.add_argument("-o", "--output", default="docs/results")
    lt.set_defaults(func=cmd_loadtest)


def cmd_loadtest_adapters(args: argparse.Namespace) -> int:
    from lcmserve.server.adapter_load import RANDOM, AdapterChange, check_adapters_under_load

    for name in ("requests", "concurrency", "steps", "max_batch_size", "rank"):
        if getattr(args, name) < 1:
            raise InvalidInputError.out_of_range(name, getattr(args, name), "an integer >= 1")
    adapters: dict[str, str | None] = {}
    for entry in args.adapter or ["a0", "a1", "a2"]:
        name, _, path = entry.partition("=")
        if not name or name in adapters:
            raise InvalidInputError(f"adapter: {entry!r} is not NAME or NAME=PATH with a new NAME", param="adapter")
        adapters[name] = path or None
    changes = [AdapterChange.parse("add", text, default_path=RANDOM) for text in args.add or ()]
    changes += [AdapterChange.parse("remove", text) for text in args.remove or ()]
    threads = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]  # it shapes the latency
    command = " ".join([*threads, "lcmserve", shlex.join(sys.argv[1:])])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the report
    report = check_adapters_under_load(args.model, adapters, changes, Path(args.output), name=args.name,
                                       requests=args.requests, concurrency=args.concurrency, steps=args.steps,
                                       max_batch_size=args.max_batch_size, rank=args.rank, command=command,
                                       server_log=Path(args.server_log) if args.server_log else None)
    print((Path(args.output) / f"{args.name}.md").read_text())
    return 1 if report["problems"] else 0


def _add_loadtest_adapters(sub) -> None:
    lt = sub.add_parser("loadtest-lora", help="bounded loopback load over LoRA adapters while adapters are "
                        "added and removed; exits 1 if a request was lost, got a 5xx or a wrong answer",
                        description="Starts `lcmserve serve` on 127.0.0.1 with the adapters, sends the requests (one "
                        "adapter each, in turn) and the changes, and writes NAME.json and NAME.md. An adapter given "
                        "without a path is a random LoRA for the model's UNet, made for the run.")
    lt.add_argument("--model", default="preset:tiny-sd", help="model the local server loads")
    lt.add_argument("--adapter", action="append", metavar="NAME[=PATH]",
                    help="an adapter loaded at start (repeat; default: a0, a1, a2, random)")
    lt.add_argument("--add", action="append", metavar="NAME[=PATH]@N",
                    help="load an adapter (POST /v1/adapters) once N requests have been answered; repeat")
    lt.add_argument("--remove", action="append", metavar="NAME@N",
                    help="remove an adapter (DELETE /v1/adapters/NAME) once N requests have been answered; repeat")
    lt.add_argument("--requests", type=int, default=200)
    lt.add_argument("--concurrency", type=int, default=16)
    lt.add_argument("--steps", type=int, default=4)
    lt.add_argument("--max-batch-size", type=int, default=8)
    lt.add_argument("--rank", type=int, default=4, help="rank of the random LoRAs")
    lt.add_argument("--name", default="adapters-load", help="file name of the report, without extension")
    lt.add_argument("--server-log", default=None, help="write the server's log to this file")
    lt.add_argument("-o", "--output", default="docs/results")
    lt.set_defaults(func=cmd_loadtest_adapters)
