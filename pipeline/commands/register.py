"""`kiln register`: a MODEL dir into the MLflow model registry, optionally under an alias."""

from __future__ import annotations

from pipeline.commands import common

NAME = "register"
HELP = "Register a MODEL dir in the MLflow model registry, optionally with an alias."
EXAMPLE = "kiln register runs/125m/model --name kiln-125m --alias champion"


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--name", required=True)
    p.add_argument("--alias")


def run(args) -> dict:
    from pipeline.console import log

    result = common.tracker(args).register(args.model, args.name, args.alias)
    log.info("registered %s as %s%s", args.model, result["uri"], f" (@{args.alias})" if args.alias else "")
    return result
