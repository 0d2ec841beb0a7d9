"""`kiln fetch`: a registered model downloaded into a MODEL dir (or its transformers form), checksums verified."""

from __future__ import annotations

from pipeline.commands import common

NAME = "fetch"
HELP = "Download a registered model into a MODEL dir and verify its checksums."
EXAMPLE = "kiln fetch models:/kiln-125m@champion --out /tmp/champion --format hf"


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("uri", metavar="models:/NAME@ALIAS|models:/NAME/VERSION")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", choices=["kiln", "hf"], default="kiln",
                   help="kiln: the MODEL dir; hf: its transformers form (from_pretrained loads it)")


def run(args) -> dict:
    from pipeline.console import log

    result = common.tracker(args, must_exist=True).fetch(args.uri, args.out, args.format)
    log.info("%s -> %s (%s form, checksums verified%s)", args.uri, result["out"], args.format,
             ", cached" if result.get("cached") else "")
    return result
