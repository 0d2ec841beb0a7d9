"""The `kiln` subcommands: each takes the parsed arguments and returns a dict, the `--json` summary.

Heavy imports happen inside each handler, so `kiln --help` stays fast and a broken optional
stage cannot break the others. The parser lives in pipeline/cli.py.
"""

from __future__ import annotations

import json
import os
import sys

from pydantic import BaseModel

from pipeline.config import ConfigError, KilnError


def _locked(out, what: str):
    """The exclusive lock on a stage's --out (pipeline/outlock.py), held by the job's rank 0."""
    from pipeline.console import is_main_process
    from pipeline.outlock import locked

    return locked(out, what, enabled=is_main_process())


def _config(args, kind: str, base: dict | None = None):
    """The `kind` config: the --config file, then the flags given (`base`: {key: flag value}), then --set.
    An error about a key a flag of the same name set names that flag."""
    from pipeline.config import load_config

    base = {k: v for k, v in (base or {}).items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k, v in base.items() if hasattr(args, k) and not isinstance(v, dict)}
    return load_config(kind, args.config, args.set, base=base, flags=flags)


def _flags(args, schema) -> dict:
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


def cmd_prep(args) -> dict:
    from pipeline import tracked
    from pipeline.console import print_table, progress

    cfg = _config(args, "prep", _prep_flags(args))
    with _locked(args.out, "kiln prep"):
        return tracked.prep(args.inputs, args.out, cfg, args.tracking_uri, progress=progress, table=print_table,
                            overwrite=args.overwrite)


def _prep_flags(args) -> dict:
    langs = args.langs.split(",") if args.langs else None
    return {
        "text_field": args.text_field,
        "id_field": args.id_field,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "vocab_size": args.vocab_size,
        "tokenizer": args.tokenizer,
        "val_fraction": args.val_fraction,
        "dedup": False if args.no_dedup else None,
        "langs": langs,
        "decontaminate": {"paths": args.decontaminate} if args.decontaminate else None,
    }


def train_config(args):
    """`kiln train`'s RunConfig from its parsed flags; `kiln launch` reads a launched `kiln train` with it too."""
    from pipeline.config import RunConfig

    return _config(args, "train", _flags(args, RunConfig))


def cmd_train(args) -> dict:
    cfg = train_config(args)
    from pipeline import tracked

    with _locked(cfg.out, "kiln train"):
        return tracked.train(cfg, args.tracking_uri)


def cmd_verify(args) -> dict:
    """Full check of prepared corpora: every shard's sha256 against its manifest, several shards at a time."""
    import time

    from pipeline.console import log
    from pipeline.data.corpus import PreparedCorpus

    t0, total, shards = time.perf_counter(), 0, 0
    for path in args.data:
        corpus = PreparedCorpus(path, verify=False)
        total += corpus.verify_full(threads=args.threads)
        shards += len(corpus.manifest["shards"])
        log.info("%s: %d shards match the manifest", path, len(corpus.manifest["shards"]))
    seconds = time.perf_counter() - t0
    return {"corpora": len(args.data), "shards": shards, "bytes": total, "seconds": round(seconds, 2),
            "gb_per_s": round(total / 1e9 / max(seconds, 1e-9), 3), "ok": True}


def cmd_export(args) -> dict:
    from pipeline.export import export

    return export(args.source, args.out, args.format)


def cmd_quantize(args) -> dict:
    cfg = _config(args, "quantize", {"method": args.method, "bits": args.bits, "group_size": args.group_size, "calib": args.calib})
    from pipeline import tracked

    with _locked(args.out, "kiln quantize"):
        summary = tracked.quantize(args.model, cfg, args.out, args.tracking_uri)
    _post_table("kiln quantize", summary)
    return summary


def cmd_distill(args) -> dict:
    cfg = _config(args, "distill")
    from pipeline import tracked
    from pipeline.console import is_main_process

    with _locked(args.out, "kiln distill"):
        summary = tracked.distill(args.teacher, args.student_config, args.data, args.out, cfg, args.tracking_uri)
    if is_main_process():
        _post_table("kiln distill", summary)
    return summary


def cmd_prune(args) -> dict:
    cfg = _config(args, "prune", {"sparsity": args.sparsity, "pattern": args.pattern})
    from pipeline import tracked

    with _locked(args.out, "kiln prune"):
        summary = tracked.prune(args.model, cfg, args.out, args.tracking_uri)
    _post_table("kiln prune", summary)
    return summary


def _post_table(title: str, summary: dict) -> None:
    from pipeline.console import kv_table

    kv_table(title, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))
                     or (k == "registered" and v)})


def _tracker(args, must_exist: bool = False, cfg=None):
    """A Tracker from `cfg.tracking` (eval, generate) or, for the registry commands, from `--config`'s
    tracking: section and `--set tracking.*=...`; and `--tracking-uri`.
    `must_exist`: a read-only command, which errors instead of creating a store."""
    from pipeline.config import TrackingConfig, apply_overrides, build, load_yaml
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


def cmd_eval(args) -> dict:
    from pipeline.config import EvalConfig
    from pipeline.console import kv_table

    cfg = _config(args, "eval", _flags(args, EvalConfig))
    if args.compare:
        if args.model or cfg.data or cfg.tasks:
            raise ConfigError("--compare models:/NAME takes no MODEL, data or tasks (--data, --tasks or the config)")
        return _eval_compare(args, cfg)
    if not args.model or not (cfg.data or cfg.tasks):
        raise ConfigError("kiln eval MODEL --data DIR and/or --tasks LIST (or data:/tasks: in --config; "
                          "or kiln eval --compare models:/NAME)")
    tracker = _tracker(args, must_exist=str(args.model).startswith("models:/"), cfg=cfg)
    result: dict = {"model": args.model}
    if cfg.data:
        from pipeline.evaluate import evaluate_model

        result = evaluate_model(args.model, cfg.data, cfg.split, cfg.max_tokens, tracker=tracker)
        kv_table(f"kiln eval {args.model} on {cfg.data} ({cfg.split})",
                 {k: result[k] for k in ("tokens", "perplexity", "bits_per_token", "bits_per_byte", "tokens_per_s")})
    if cfg.tasks:
        result["lm_eval"] = _eval_tasks(args.model, cfg, tracker)
    return result


def _eval_tasks(model: str, cfg, tracker) -> dict:
    from pipeline.console import print_table
    from pipeline.harness.run import run_tasks

    tasks = cfg.tasks
    local = tracker.materialize(model)
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    result = run_tasks(local, tasks, cfg.include_path, limit, cfg.batch_size, num_fewshot=cfg.num_fewshot)
    rows = [{"task": task, "metric": k, "value": v, "docs": result["datasets"][task]["docs"]}
            for task, metrics in result["results"].items() for k, v in metrics.items()]
    print_table(f"kiln eval {model}: lm-eval", rows, ["task", "metric", "value", "docs"])
    params = {"tasks": ",".join(tasks), "limit": limit, "num_fewshot": cfg.num_fewshot}
    result["tracking"] = tracker.attach_harness(str(model), str(local), result, params)
    return result


def _eval_compare(args, cfg) -> dict:
    from pipeline.console import print_table

    rows = _tracker(args, must_exist=True, cfg=cfg).eval_table(args.compare)
    # one column per alias, one row per measurement: stays readable however many tasks were run
    aliases = [row["alias"] for row in rows]
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "alias"))
    table = [{"measurement": key, **{row["alias"]: row.get(key) for row in rows}} for key in keys]
    print_table(f"kiln eval --compare {args.compare}", table, ["measurement", *aliases])
    return {"name": args.compare, "rows": rows}


def cmd_generate(args) -> dict:
    from pipeline.config import GenerateConfig
    from pipeline.console import kv_table
    from pipeline.generate import generate

    cfg = _config(args, "generate", _flags(args, GenerateConfig))
    if cfg.prompt is None:
        raise ConfigError("no prompt: give --prompt TEXT (or prompt: in --config)")
    local = _tracker(args, must_exist=str(args.model).startswith("models:/"), cfg=cfg).materialize(args.model)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    emit(cfg.prompt)
    result = generate(local, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                      cfg.repetition_penalty, cfg.seed, on_text=emit)
    emit("\n")
    kv_table("kiln generate", {k: result[k] for k in ("new_tokens", "stopped_at_eos", "tokens_per_s", "seed")})
    result["model"] = args.model
    return result


def cmd_register(args) -> dict:
    from pipeline.console import log

    result = _tracker(args).register(args.model, args.name, args.alias)
    log.info("registered %s as %s%s", args.model, result["uri"], f" (@{args.alias})" if args.alias else "")
    return result


def cmd_fetch(args) -> dict:
    from pipeline.console import log

    result = _tracker(args, must_exist=True).fetch(args.uri, args.out, args.format)
    log.info("%s -> %s (%s form, checksums verified%s)", args.uri, result["out"], args.format,
             ", cached" if result.get("cached") else "")
    return result


def cmd_lineage(args) -> dict:
    tree = _tracker(args, must_exist=True).lineage(args.uri)
    _print_lineage(tree)
    return tree


def _print_lineage(node: dict) -> None:
    """model -> parents -> run -> datasets -> prep runs, as a rich tree on stderr."""
    from rich.tree import Tree

    from pipeline.console import console

    def add_model(parent, m: dict) -> None:
        if m.get("cycle"):
            parent.add(f"[red]model {m['model_id']} (cycle)")
            return
        t = m.get("tags", {})
        label = f"[bold]{m.get('uri') or m['name']}[/] model {m['model_id']} stage={m['stage']}"
        if m.get("version"):
            label += f" version={m['version']}"
        branch = parent.add(label)
        branch.add(f"tokenizer sha256 {t.get('kiln.tokenizer_sha256', '?')[:16]}  code {t.get('kiln.git_commit', '?')[:12]}"
                   f"  weights sha256 {t.get('kiln.weights_sha256', '?')[:16]}")
        if m.get("metrics"):
            branch.add("metrics " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(m["metrics"].items())))
        if m.get("run"):
            r = m["run"]
            run_branch = branch.add(f"run {r['name']} {r['run_id']} ({r['status']})")
            for seg in r.get("continues", []):  # the earlier runs it resumed
                run_branch.add(f"resumes run {seg['name']} {seg['run_id']} ({seg['status']}, to step {seg['last_step']})")
        else:
            run_branch = branch
        for d in m.get("datasets", []):
            db = run_branch.add(f"dataset {d.get('name') or ''} digest {d['digest'][:16]}… {d.get('source') or ''}")
            for p in d.get("prep_runs", []):
                db.add(f"prep run {p['name']} {p['run_id']} ({p['status']})")
            if not d.get("prep_runs"):
                db.add("[dim]prep run: not recorded")
        for p in m.get("parents", []):
            add_model(branch.add("[italic]made from"), p)

    root = Tree(f"lineage of {node.get('uri')}")
    add_model(root, node)
    console.print(root)


def cmd_track(args) -> dict:
    """`kiln track sync RUN_DIR`: the URI comes from the flags/env, else from RUN_DIR's record."""
    from pathlib import Path

    from pipeline.console import log
    from pipeline.credentials import without_mask
    from pipeline.tracking import RUN_RECORD, Tracker

    tracker = _tracker(args)
    record = Path(args.run_dir) / RUN_RECORD
    if not (args.tracking_uri or tracker.cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")) and record.exists():
        # the record holds the URI redacted; credentials come from MLFLOW_TRACKING_USERNAME/_PASSWORD
        tracker = Tracker(tracker.cfg, uri=without_mask(json.loads(record.read_text()).get("tracking_uri") or ""))
    result = tracker.sync(args.run_dir)
    log.info("replayed %d metric values into run %s at %s", result["replayed"], result["run_id"], tracker.uri)
    return result


def cmd_plot(args) -> dict:
    from pipeline.plot import plot

    return plot(args.run_dir, args.out)


def cmd_launch(args) -> dict:
    from pipeline.launcher import common

    command = common.strip_dashdash(args.job_command)
    env = common.parse_env(args.env)
    common.check_launch_values({k: v for k, v in vars(args).items() if k not in ("job_command", "env")}, command, env)
    if args.launcher == "deepspeed":
        from pipeline.launcher import deepspeed_job as job_kind

        job = job_kind.plan(command, args.hostfile, num_nodes=args.num_nodes, gpus_per_node=args.gpus_per_node,
                            include=args.include or "", exclude=args.exclude or "", master_addr=args.master_addr,
                            master_port=args.master_port, env=env)
        job = job_kind.launch(job, args.dry_run)
    elif args.launcher == "torchrun":
        from pipeline.launcher import torchrun_job as job_kind

        job = job_kind.plan(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port, rdzv=args.rdzv,
                            run_id=args.run_id, env=env)
        job = job_kind.launch(job, args.dry_run, args.wait_master)
    elif args.launcher == "slurm":
        from pipeline.launcher import slurm_job

        text = slurm_job.render(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_limit=args.time,
                                partition=args.partition, account=args.account, job_name=args.job_name,
                                cpus_per_task=args.cpus_per_task, env=env)
        if not args.dry_run:  # where the data is visible (shared filesystem), check it before the job queues
            from pipeline.launcher.common import check_train

            check_train(command, args.nodes * args.gpus_per_node, data="if-visible")
        job = slurm_job.launch(text, args.dry_run)
    else:
        from pipeline.launcher import ray_job

        job = ray_job.plan(command, address=args.address, working_dir=args.working_dir, env=env, pip=args.pip)
        job = ray_job.launch(job, args.dry_run, args.detach)
    if job.get("returncode"):
        raise KilnError(f"{args.launcher} launcher exited with status {job['returncode']}")
    return job


def cmd_demo(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(args.out, quick=args.quick)


def cmd_plan(args) -> dict:
    from pipeline.console import kv_table
    from pipeline.plan import human_count, make_plan

    given = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "zero_stage": args.zero_stage, "precision": args.precision,
             "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
             "activation_checkpointing": args.activation_checkpointing,
             "sequence_parallel": args.sequence_parallel or None}
    layout = None  # none given: make_plan recommends one
    if any(v is not None for v in given.values()):
        layout = {"tp": 1, "pp": 1, "zero_stage": 1, "precision": "bf16", "micro_batch_size": 1,
                  "activation_checkpointing": "none"}
        layout.update({k: v for k, v in given.items() if v is not None})
    plan = make_plan(
        flops=args.flops, gpus=args.gpus, hours=args.hours, gpu=args.gpu, mfu=args.mfu,
        tokens_per_param=args.tokens_per_param, model=args.model, layout=layout,
    )
    shown = {
        "compute budget": f"{plan['flops']:.3e} FLOPs",
        "compute-optimal params (Chinchilla)": human_count(plan["optimal_params"]),
        "compute-optimal tokens": human_count(plan["optimal_tokens"]),
        "nearest shipped config": f"configs/model/{plan['model_config']}.yaml ({human_count(plan['model_params'])} params)",
        "tokens that config gets from the budget": human_count(plan["tokens_for_model"]),
        "recommended layout" if plan["layout_recommended"] else "layout":
            ", ".join(f"{k}={v}" for k, v in plan["layout"].items() if v is not None),
    }
    if "tokens_per_s_needed" in plan:
        shown["cluster tokens/s needed"] = f"{plan['tokens_per_s_needed']:,.0f}"
    shown.update({f"memory/GPU: {k}": f"{v:,.2f} GiB" for k, v in plan["memory_gib"].items()})
    kv_table("kiln plan", shown)
    return plan
