"""``python -m fastattr info|bench|attribute`` (and, installed, the ``fastattr`` console
script)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastattr.bench import cli as bench_cli
from fastattr.data import _cli as attribute_cli


def _info(_: argparse.Namespace) -> int:
    from fastattr import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print how fastattr was built").set_defaults(run=_info)
    bench_cli.add_parser(commands)
    attribute_cli.add_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
