"""The ``specrag`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module sets
``func`` on its parser. Modules are imported by name so that heavy dependencies (torch, Ray)
load only for the command that needs them, and so that ``deploy`` (which sits above the
pipeline) can contribute ``serve`` and ``batch`` without the pipeline importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.errors import CLIError  # noqa: F401  (re-exported for command modules)

# (module, commands it registers) -- order is the order shown in --help.
COMMAND_MODULES = (
    "pipeline.commands.generate",
    "pipeline.commands.calibrate",
    "pipeline.commands.retrieval",
    "pipeline.commands.ask",
    "deploy.commands",
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [FileNotFoundError, IsADirectoryError, PermissionError]
    for module, name in (
        ("speculation.errors", "SpeculationError"),
        ("retrieval.errors", "RetrievalError"),
        ("pipeline.errors", "PipelineError"),
    ):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specrag",
        description="Retrieval-augmented generation, made fast by exact speculation.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # not written yet in this checkout
                continue
            raise
        mod.register(sub)
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
    except _user_error_types() as exc:
        if args.verbose >= 2:
            raise
        print(f"specrag {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
