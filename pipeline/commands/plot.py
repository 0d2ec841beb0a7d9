"""`kiln plot`: loss and throughput curves of a run's metrics.jsonl, as a PNG."""

from __future__ import annotations

from pipeline.commands.common import add_common_options

NAME = "plot"
HELP = "Plot loss and throughput curves from a run's metrics.jsonl to PNG."
EXAMPLE = "kiln plot runs/125m --out runs/125m/curves.png"


def add_arguments(p) -> None:
    add_common_options(p, config=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG")


def run(args) -> dict:
    from pipeline.plot import plot

    return plot(args.run_dir, args.out)
