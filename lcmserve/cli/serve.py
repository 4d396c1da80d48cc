"""Serve a model: ``serve`` (REST, gRPC, /metrics) and ``loadtest`` (batching under load, on loopback)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lcmserve.errors import InvalidInputError


def add(sub) -> None:
    _add_serve(sub)
    _add_loadtest(sub)


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
