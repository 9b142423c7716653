"""The ``specrag`` command line: the top of the layers (``deploy -> pipeline -> {retrieval,
speculation}``), so it may name every command.

Each command module exposes ``register(subparsers)`` and sets ``func`` on its parser; the
modules import their heavy dependencies (torch, Ray) inside the command functions, so that
``specrag --help``, ``generate``, ``ask`` and ``ingest`` never import Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deploy import commands as deploy_commands
from deploy import errors
from pipeline.commands import ask, calibrate, generate, retrieval

# order is the order shown in --help
COMMANDS = (generate, calibrate, retrieval, ask, deploy_commands)

# what the CLI prints as one line (exit 1) instead of a traceback (-vv shows it)
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, IsADirectoryError, PermissionError, *errors.USER_ERRORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specrag",
        description="Retrieval-augmented generation, made fast by exact speculation.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose >= 2:
            raise
        print(f"specrag {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
