"""What several commands share: the common options, a config from --config/flags/--set, the --out lock,
the Tracker a command talks to, and recording a stage's result in its MLflow run."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import ConfigError, TrackingConfig


def add_common_options(p: argparse.ArgumentParser, config: bool = True) -> None:
    """The options every subcommand has; --config/--set only where it reads a config (else they are refused,
    not ignored)."""
    g = p.add_argument_group("common options")
    if config:
        g.add_argument("--config", metavar="FILE", help="YAML config (may `extends:` others)")
        g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, value parsed as YAML (repeatable): --set train.lr=3e-4")
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def load(args, kind: str, base: dict | None = None):
    """The `kind` config: the --config file, then the flags given (`base`: {key: flag value}), then --set.
    An error about a key a flag of the same name set names that flag."""
    from pipeline.config import load_config

    base = {k: v for k, v in (base or {}).items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k, v in base.items() if hasattr(args, k) and not isinstance(v, dict)}
    return load_config(kind, args.config, args.set, base=base, flags=flags)


def flags(args, schema) -> dict:
    """The flags given that name a key of `schema`, nested as the config is: a flag sets the key its dest
    names (--max-tokens: max_tokens; add_argument("--steps", dest="train.steps"): train.steps)."""
    base: dict = {}
    for dest, value in vars(args).items():
        *parents, leaf = dest.split(".")
        fields = schema.model_fields
        for part in parents:
            inner = fields[part].annotation if part in fields else None
            fields = inner.model_fields if isinstance(inner, type) and issubclass(inner, BaseModel) else {}
        if value is None or leaf not in fields:
            continue
        node = base
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return base


def locked(out, what: str):
    """The exclusive lock on a stage's --out (pipeline/outlock.py), held by the job's rank 0."""
    from pipeline.console import is_main_process
    from pipeline.outlock import locked as out_lock

    return out_lock(out, what, enabled=is_main_process())


def tracker(args, must_exist: bool = False, cfg=None):
    """A Tracker from `cfg.tracking` (eval, generate) or, for the registry commands, from `--config`'s
    tracking: section and `--set tracking.*=...`; and `--tracking-uri`.
    `must_exist`: a read-only command, which errors instead of creating a store."""
    from pipeline.config import apply_overrides, build, load_yaml
    from pipeline.tracking import Tracker

    if cfg is not None:
        return Tracker(cfg.tracking, uri=args.tracking_uri, must_exist=must_exist)
    for item in args.set:
        if not item.startswith("tracking."):
            raise ConfigError(f"--set {item}: kiln {args.command} only takes tracking.* keys")
    data = (load_yaml(args.config).get("tracking") or {}) if args.config else {}
    data, origins = apply_overrides(data, [s[len("tracking."):] for s in args.set])
    cfg = build(TrackingConfig, data, args.config or "<defaults>", origins)
    return Tracker(cfg, uri=args.tracking_uri, must_exist=must_exist)


# --------------------------------------------------------------------------- a stage's MLflow run
# The stages (data_prep.runner, pipeline.train, pipeline.post.*) know nothing about MLflow; their commands
# run them inside `tracker.stage_run(...)`. Tracking never stops a stage: when the server is unreachable
# the Tracker warns once and the stage goes on (metrics stay in metrics.jsonl for `kiln track sync`).


def register(run, model_dir: Path, stage: str, tracking: TrackingConfig, parent=None) -> dict | None:
    """Log the stage's MODEL dir on its run, registered as tracking.register_as (@tracking.alias) if set."""
    return run.log_model(model_dir, stage, parent=parent, register_as=tracking.register_as, alias=tracking.alias)


def log_stage_figures(run, summary: dict, curves: dict[str, list[str]]) -> None:
    """Each curve (metric -> summary keys in order: before, ..., after) as one metric over steps 0, 1, ...,
    and every other number of the summary as a metric at step 0: the run page shows what the stage did."""
    for metric, keys in curves.items():
        for step, key in enumerate(k for k in keys if summary.get(k) is not None):
            run.log_metrics({metric: summary[key]}, step=step)
    used = {k for keys in curves.values() for k in keys}
    run.log_metrics({k: v for k, v in summary.items() if k not in used}, step=0)


def post_table(title: str, summary: dict) -> None:
    """A post-training stage's summary as a table on stderr (its scalars, and where it was registered)."""
    from pipeline.console import kv_table

    kv_table(title, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))
                     or (k == "registered" and v)})
