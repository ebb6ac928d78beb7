"""Command line: ``python -m heteromem {demo,info,plan}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heteromem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show how heteromem was built and what it uses here")
    demo = sub.add_parser("demo", help="train a model whose state is 3x the device budget")
    from heteromem.cli.demo import add_arguments

    add_arguments(demo)
    planner = sub.add_parser("plan", help="will a model train here: bytes per tier, placement, "
                                          "a lower bound on step time")
    from heteromem.cli.plan import add_arguments as add_plan_arguments

    add_plan_arguments(planner)
    args = parser.parse_args(argv)
    if args.command == "info":
        import heteromem

        print(heteromem.build_info())
        return 0
    if args.command == "plan":
        from heteromem.cli.plan import run as run_plan

        return run_plan(args)
    from heteromem.cli.demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
