"""Entry point of the ``hetmoe`` console script.

Sub-commands live in sibling modules named ``<name>_command`` exposing
``register(subparsers)``; each registers a parser whose ``handler`` default runs it.
They are discovered rather than listed so that adding a command touches one file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from hetmoe_operator import __version__, errors


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered sub-command."""
    parser = argparse.ArgumentParser(
        prog="hetmoe",
        description="Plan and run mixture-of-experts training on mixed accelerator grades.",
    )
    parser.add_argument("--version", action="version", version=f"hetmoe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    package = importlib.import_module("hetmoe_operator.cli")
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module.name.endswith("_command"):
            importlib.import_module(f"hetmoe_operator.cli.{module.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; user errors print one clear message and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except errors.UserError as error:
        print(f"hetmoe: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        print(
            f"hetmoe: error: {errors.describe_validation_error(error, args.command)}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("hetmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
