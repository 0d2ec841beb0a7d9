"""`kiln export`: a checkpoint or MODEL dir -> a MODEL dir (safetensors) or a transformers dir."""

from __future__ import annotations

from pipeline.commands.common import add_common_options

NAME = "export"
HELP = "Consolidate a checkpoint into a MODEL dir (safetensors) or a HF transformers dir."
EXAMPLE = "kiln export runs/125m/checkpoints/latest --format hf --out exports/125m-hf"


def add_arguments(p) -> None:
    add_common_options(p, config=False)
    p.add_argument("source", metavar="CKPT|MODEL")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> dict:
    from pipeline.export import export

    return export(args.source, args.out, args.format)
