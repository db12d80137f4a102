"""`stream4d`: one command, one sub-command per job.

Each layer contributes its sub-commands through a module exposing `register(subparsers)`, which adds parsers
and sets `func` (called with the parsed args, returning an exit code). Modules load lazily so that `stream4d sim`
never imports rclpy or torch it does not need.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command modules, in the order they appear in --help
COMMAND_MODULES = (
    "ros2_stream4d.sim.cli",      # sim
    "ros2_stream4d.eval.cli",     # eval
    "ros2_stream4d.ros.cli",      # run, play, process
    "ros2_stream4d.train.cli",    # train
    "ros2_stream4d.bench.cli",    # bench
    "ros2_stream4d.demo",         # demo
    "ros2_stream4d.viewer.cli",   # view
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream4d", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part of the package is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
