"""`kiln lineage`: the chain model -> parents -> training run -> dataset -> prep run, as a tree."""

from __future__ import annotations

from pipeline.commands import common

NAME = "lineage"
HELP = "Print the chain model -> parents -> training run -> dataset -> prep run."
EXAMPLE = "kiln lineage models:/kiln-125m@int8 --json"


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("uri", metavar="models:/NAME@ALIAS")


def run(args) -> dict:
    tree = common.tracker(args, must_exist=True).lineage(args.uri)
    print_lineage(tree)
    return tree


def print_lineage(node: dict) -> None:
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
