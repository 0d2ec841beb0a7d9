"""`kiln eval`: perplexity on prepared shards and lm-evaluation-harness tasks of a MODEL, recorded on it;
`--compare` prints a registered model's results across its aliases."""

from __future__ import annotations

from typing import get_args

from pipeline.commands import common
from pipeline.config import ConfigError, EvalConfig

NAME = "eval"
HELP = ("Perplexity on prepared shards (--data) and lm-evaluation-harness tasks (--tasks) of a MODEL; --compare "
        "prints a registered model's results across its aliases.")
EXAMPLE = ("kiln eval models:/kiln-125m@int8 --data data/prepped --tasks kiln_pydoc,kiln_stdlib_mc --limit 100\n"
           "  kiln eval --compare models:/kiln-125m")


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("model", nargs="?", metavar="MODEL", help="MODEL dir, transformers dir or models:/ URI")
    p.add_argument("--data", metavar="DIR", help="prep output: perplexity and bits/byte on its --split")
    p.add_argument("--split", choices=get_args(EvalConfig.model_fields["split"].annotation))
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--tasks", metavar="LIST", help="comma-separated lm-eval tasks (Kiln's offline ones: "
                   "kiln_pydoc, kiln_stdlib_mc; any task of lm-eval's catalogue where its data can be had)")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="more lm-eval task YAMLs, read as data (repeatable): no YAML tags such as !function, "
                        "no include: outside DIR, and no task name that Kiln, lm-eval or another DIR defines")
    p.add_argument("--trusted-include-path", action="append", metavar="DIR",
                   help="a task directory you control (repeatable): its !function hooks run Python as you; "
                        "names still may not collide")
    p.add_argument("--limit", type=float, metavar="N", help="documents per task (a fraction when below 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--apply-chat-template", action="store_true", default=None,
                   help="lm-eval's option: requests in the model's chat format (a `kiln sft` model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--compare", metavar="models:/NAME", help="print the recorded evals of every alias of NAME")


def run(args) -> dict:
    from pipeline.console import kv_table

    cfg = common.load(args, "eval", common.flags(args, EvalConfig))
    if args.compare:
        if args.model or cfg.data or cfg.tasks:
            raise ConfigError("--compare models:/NAME takes no MODEL, data or tasks (--data, --tasks or the config)")
        return _compare(args, cfg)
    if not args.model or not (cfg.data or cfg.tasks):
        raise ConfigError("kiln eval MODEL --data DIR and/or --tasks LIST (or data:/tasks: in --config; "
                          "or kiln eval --compare models:/NAME)")
    if cfg.data:  # before the model is fetched or loaded
        from pipeline.data.corpus import check_prep_dir

        check_prep_dir(cfg.data)
    tracker = common.tracker(args, must_exist=str(args.model).startswith("models:/"), cfg=cfg)
    result: dict = {"model": args.model}
    if cfg.data:
        from pipeline.evaluate import evaluate_model

        result = evaluate_model(args.model, cfg.data, cfg.split, cfg.max_tokens, tracker=tracker)
        kv_table(f"kiln eval {args.model} on {cfg.data} ({cfg.split})",
                 {k: result[k] for k in ("tokens", "perplexity", "bits_per_token", "bits_per_byte", "tokens_per_s",
                                         "device", "threads", "batch_size")})
    if cfg.tasks:
        result["lm_eval"] = _tasks(args.model, cfg, tracker)
    return result


def _tasks(model: str, cfg, tracker) -> dict:
    from pipeline.console import print_table
    from pipeline.harness.run import run_tasks

    tasks = cfg.tasks
    local = tracker.materialize(model)
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    result = run_tasks(local, tasks, cfg.include_path, limit, cfg.batch_size, num_fewshot=cfg.num_fewshot,
                       trusted_include_path=cfg.trusted_include_path, apply_chat_template=cfg.apply_chat_template)
    rows = [{"task": task, "metric": k, "value": v, "docs": result["datasets"][task]["docs"]}
            for task, metrics in result["results"].items() for k, v in metrics.items()]
    print_table(f"kiln eval {model}: lm-eval", rows, ["task", "metric", "value", "docs"])
    params = {"tasks": ",".join(tasks), "limit": limit, "num_fewshot": cfg.num_fewshot,
              "apply_chat_template": cfg.apply_chat_template}
    result["tracking"] = tracker.attach_harness(str(model), str(local), result, params)
    return result


def _compare(args, cfg) -> dict:
    from pipeline.console import log, print_table

    rows = common.tracker(args, must_exist=True, cfg=cfg).eval_table(args.compare)
    # one column per alias, one row per measurement: stays readable however many tasks were run
    aliases = [row["alias"] for row in rows]
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "alias"))
    table = [{"measurement": key, **{row["alias"]: row.get(key) for row in rows}} for key in keys]
    notes = []
    for key in [k for k in keys if k.endswith("tokens_per_s")]:
        ratio, note = speed_ratio(rows, key)
        if ratio:
            table.append({"measurement": f"{key} / {aliases[0]}'s", **ratio})
        if note:
            notes.append(note)
    print_table(f"kiln eval --compare {args.compare}", table, ["measurement", *aliases])
    for note in notes:
        log.info("%s", note)
    return {"name": args.compare, "rows": rows, "speed_notes": notes}


def speed_ratio(rows: list[dict], key: str) -> tuple[dict | None, str | None]:
    """Each alias's `key` (a tokens/s) over the first alias's, when every one was measured alike: the same
    device, CPU threads and batch size (the `.device`/`.threads`/`.batch_size` beside it). Otherwise no ratio,
    and one line saying why: a speed measured on 2 threads against one on 1 is not a property of the model."""
    from pipeline.evaluate import SPEED_SETUP

    split = key[: -len("tokens_per_s")]
    measured = [row for row in rows if row.get(key) is not None]
    if len(measured) < 2:
        return None, None
    setups = {row["alias"]: tuple(row.get(split + k) for k in SPEED_SETUP) for row in measured}
    if any(None in setup for setup in setups.values()):
        old = ", ".join(a for a, setup in setups.items() if None in setup)
        return None, f"{key}: not compared; {old} recorded no device/threads/batch size with it (rerun kiln eval)"
    differ = [i for i in range(len(SPEED_SETUP)) if len({setup[i] for setup in setups.values()}) > 1]
    if differ:
        def text(v) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        shown = "; ".join(f"{alias}: " + ", ".join(f"{SPEED_SETUP[i]} {text(setup[i])}" for i in differ)
                          for alias, setup in setups.items())
        return None, (f"{key}: not compared, measured with different {' and '.join(SPEED_SETUP[i] for i in differ)} "
                      f"({shown})")
    base = measured[0][key]
    return {row["alias"]: f"{row[key] / base:.2f}x" for row in measured}, None
