"""`kiln quantize`: a MODEL dir -> int8 (torchao), round-to-nearest or GPTQ codes, in an MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from pipeline.commands.common import add_common_options, load, locked, log_stage_figures, post_table, register
from pipeline.config import QuantizeConfig
from pipeline.quant_methods import ALIASES

NAME = "quantize"
HELP = "Quantize a MODEL: int8 (torchao), round-to-nearest or GPTQ at 2-8 bits."
EXAMPLE = "kiln quantize runs/125m/model --method gptq --bits 4 --group-size 128 --calib data/prepped --out models/125m-gptq4"


def add_arguments(p) -> None:
    add_common_options(p)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", choices=[*get_args(QuantizeConfig.model_fields["method"].annotation), *ALIASES])
    p.add_argument("--bits", type=int, help=QuantizeConfig.model_fields["bits"].description)
    p.add_argument("--group-size", type=int)
    p.add_argument("--calib", metavar="DIR", help="prep output dir for calibration sequences")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> dict:
    cfg = load(args, "quantize", {"method": args.method, "bits": args.bits, "group_size": args.group_size,
                                  "calib": args.calib})
    if cfg.calib:
        from pipeline.data.corpus import check_prep_dir

        check_prep_dir(cfg.calib)
    from pipeline.post.quantize import quantize
    from pipeline.tracking import Tracker

    with locked(args.out, "kiln quantize"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)
        with tracker.stage_run("quantize", params=cfg, run_dir=args.out) as stage:
            parent = tracker.materialize(args.model)
            if cfg.calib:
                stage.log_dataset(cfg.calib, split="train", context="calibration")
            summary = quantize(parent, cfg, args.out)
            summary["size_mb"] = summary["size_bytes"] / 1e6
            summary["parent_size_mb"] = summary["parent_size_bytes"] / 1e6
            log_stage_figures(stage, summary, {"perplexity": ["parent_perplexity", "perplexity"],
                                               "size_mb": ["parent_size_mb", "size_mb"]})
            summary["registered"] = register(stage, Path(args.out), "quantized", cfg.tracking, parent=args.model)
    post_table("kiln quantize", summary)
    return summary
