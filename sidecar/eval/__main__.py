"""`python -m sidecar.eval ...`: the evaluator's subcommands alone (the parser `rerank-sidecar` uses too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar.eval.cli import register


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerank-sidecar", description="Offline replay evaluator.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
