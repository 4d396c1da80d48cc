"""The ``lcmserve`` command line, one module of this package per group of commands:

  run a model      generate, info, export, bench        (cli/engine.py)
  serve it         serve, loadtest, loadtest-lora       (cli/serve.py)
  make an LCM      distill                              (cli/distill.py)
  shapes domain    shapes ..., eval, eval-compare       (cli/shapes.py, cli/eval.py)

``lcmserve COMMAND --help`` lists a command's flags. Every error that names a setting is
printed with its flag, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from lcmserve import __version__
from lcmserve.cli import distill, engine, eval, serve, shapes
from lcmserve.errors import LCMServeError

# (title, module): each module's add(sub) registers its commands; --help lists them in these groups.
GROUPS = (
    ("run a model", engine),
    ("serve it", serve),
    ("make an LCM", distill),
    ("the bundled shapes domain and its judges", (shapes, eval)),
)


def _quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (load bars, deprecations) out of our output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmserve", usage="lcmserve [-h] [--version] [-v] COMMAND ...",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Distil, run and serve Latent Consistency Models.")
    parser.add_argument("--version", action="version", version=f"lcmserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The flat list argparse would print is replaced by the grouped one in the epilog.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="lcmserve")
    lines = ["commands (lcmserve COMMAND --help for its flags):"]
    for title, modules in GROUPS:
        before = len(sub._choices_actions)
        for module in modules if isinstance(modules, tuple) else (modules,):
            module.add(sub)
        lines.append(f"\n  {title}")
        lines += [textwrap.fill(action.help, 100, initial_indent=f"    {action.dest:<14}", subsequent_indent=" " * 18)
                  for action in sub._choices_actions[before:]]
    parser.epilog = "\n".join(lines)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if args.command == "generate" and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        return args.func(args)
    except LCMServeError as exc:
        flag = f"--{exc.param.replace('_', '-')}" if exc.param else ""
        print(f"lcmserve: error: {exc.message}" + (f" (see {flag})" if flag else ""), file=sys.stderr)
        return 2
