"""``hetmoe crd``: print the MoEJob CustomResourceDefinition generated from the models."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``crd`` sub-command."""
    parser = subparsers.add_parser(
        "crd", help="print the MoEJob CRD (YAML) generated from the API models"
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="write to this file instead of standard output (e.g. crds/moejob.yaml)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print or write the CRD."""
    from hetmoe_operator.crd import crd_yaml

    text = crd_yaml()
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text)
    return 0
