"""`kiln demo`: the whole pipeline on a small corpus built from text that ships with Python."""

from __future__ import annotations

from pipeline.commands.common import add_common_options

NAME = "demo"
HELP = "Run the whole pipeline on a small corpus built from text that ships with Python."
EXAMPLE = "kiln demo --out demo_out"


def add_arguments(p) -> None:
    add_common_options(p, config=False)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="working directory (recreated)")
    p.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps (the end-to-end test)")


def run(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(args.out, quick=args.quick)
