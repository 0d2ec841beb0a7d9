"""The import rules docs/ARCHITECTURE.md states, checked on the source: parsed (ast), never imported, so the
check takes well under a second and sees imports inside functions too.

The layer order has one owner, the table between the `layers` markers in docs/ARCHITECTURE.md: this test
reads it from there. A module may import its own layer and the layers above it in the table (lower ones),
never a later (higher) one; importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so those
count too. And no module reaches itself through imports (test_no_import_cycles), inside one layer as well.
"""

from __future__ import annotations

import ast
import functools
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("data_prep", "pipeline")

# Third-party packages only some files may import: {package: (allowed path prefixes, why)}.
ONLY_IN = {
    "mlflow": (("pipeline/tracking/",), "the CLI, training and checkpoints start without MLflow"),
    "ray": (("data_prep/runner.py", "pipeline/launcher/ray_job.py"),
            "Ray runs prep (runner) and is the job client of `kiln launch ray`; nothing else starts it"),
}
# Modules that must not import these (prefixes of the imported module's dotted name).
NEVER = {
    "pipeline/model/gpt.py": ("deepspeed", "torch.distributed"),  # the model runs in one process, no engine
    "pipeline/model/layers.py": ("deepspeed", "torch.distributed"),
}


def layers(doc: str | None = None) -> list[tuple[str, list[str]]]:
    """[(layer, [path prefixes])] bottom to top, from the table between the markers in ARCHITECTURE.md."""
    text = doc if doc is not None else DOC.read_text()
    block = re.search(r"<!-- layers:start -->\n(.*?)<!-- layers:end -->", text, re.S)
    assert block, f"{DOC}: the layer table's markers are gone"
    rows = [line.split("|")[1:-1] for line in block.group(1).splitlines() if line.startswith("| ")]
    table = [(cells[0].strip(" *"), re.findall(r"`([^`]+)`", cells[1])) for cells in rows[1:]]  # after the header
    assert table and all(paths for _, paths in table), "every layer row names its paths in backticks"
    return table


def sources(planted: dict[str, str] | None = None) -> dict[str, str]:
    """{repo-relative path: source} of every module; `planted` adds lines to some (the mutant tests)."""
    files = {p.relative_to(ROOT).as_posix(): p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    for path, extra in (planted or {}).items():
        files[path] += extra
    return files


@functools.cache
def module_file(module: str) -> str | None:
    """The repo-relative file behind a dotted module name of ours, or None (third party, or not a module)."""
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT).as_posix()
    return None


@functools.cache  # parsed once per source text: the tests below share the work
def imports(path: str, text: str) -> tuple[tuple[int, str], ...]:
    """(line, dotted module) for every import in the file, at any depth (functions included), relative
    imports resolved, importlib.import_module("literal") too. `from a import b` gives `a` and `a.b` (b may be
    a submodule: `from torch import distributed`)."""
    package = path.split("/")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text, path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return tuple(found)


def layer_of(path: str, table) -> int:
    """Index of the layer whose longest path prefix matches `path`."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(table) for prefix in prefixes
                if path == prefix or (prefix.endswith("/") and path.startswith(prefix))), default=None)
    assert best is not None, f"{path}: in no layer of {DOC.name}'s table; add it to one"
    return best[1]


def upward_imports(table, files: dict[str, str]) -> list[str]:
    problems = []
    for here, text in files.items():
        mine = layer_of(here, table)
        for line, module in imports(here, text):
            parts = module.split(".")
            for n in range(1, len(parts) + 1):  # the packages' __init__ run too
                target = module_file(".".join(parts[:n]))
                if target and layer_of(target, table) > mine:
                    problems.append(f"{here}:{line} imports {'.'.join(parts[:n])} ({target}: layer "
                                    f"{table[layer_of(target, table)][0]}, above {table[mine][0]})")
    return sorted(set(problems))


def test_the_layer_table_covers_every_module():
    table = layers()
    assert [name for name, _ in table][0] == "data_prep" and table[-1][0] == "cli"
    for path in sources():
        layer_of(path, table)


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(layers(), sources()) == []


def test_heavy_dependencies_stay_where_they_belong():
    assert dependency_problems(sources()) == []


def dependency_problems(files: dict[str, str]) -> list[str]:
    problems = []
    for here, text in files.items():
        for line, module in imports(here, text):
            top = module.split(".")[0]
            if top in ONLY_IN and not here.startswith(ONLY_IN[top][0]):
                problems.append(f"{here}:{line} imports {top}: only {', '.join(ONLY_IN[top][0])} may "
                                f"({ONLY_IN[top][1]})")
            for banned in NEVER.get(here, ()):
                if module == banned or module.startswith(banned + "."):
                    problems.append(f"{here}:{line} imports {banned}")
    return sorted(set(problems))


def test_prep_steps_share_helpers_through_base_and_text_only():
    """A step (data_prep/steps/*.py) imports no other step: what two steps share lives in base.py or text.py."""
    assert step_problems(sources()) == []


def step_problems(files: dict[str, str]) -> list[str]:
    shared = {"data_prep.steps.base", "data_prep.steps.text"}
    problems = {f"{path}:{line} imports {module}" for path, text in files.items()
                if re.fullmatch(r"data_prep/steps/\w+\.py", path) and not path.endswith("__init__.py")
                for line, module in imports(path, text)
                if module_file(module) and module.startswith("data_prep.steps.") and module not in shared}
    return sorted(problems)


PLANTED = "\n\ndef _planted():\n    import pipeline.train\n"


@pytest.mark.parametrize("mutant, expected", [
    ("pipeline/model/flops.py", "imports pipeline.train"),            # a lower layer reaching up
    ("data_prep/stages.py", "imports pipeline.train"),                 # data_prep into pipeline
    ("pipeline/tracking/sync.py", None),                               # tracking may use training's layer
])
def test_the_checks_catch_a_planted_upward_import(mutant, expected):
    """The rule itself, on the sources with one lazy import added inside a function."""
    files = sources({mutant: PLANTED})
    problems = upward_imports(layers(), files)
    if expected is None:
        assert problems == []
    else:
        line = len(files[mutant].splitlines())
        assert problems and all(p.startswith(f"{mutant}:{line} ") for p in problems), problems
        assert any(expected in p for p in problems), problems


def test_the_dependency_rules_catch_planted_imports():
    gpt, c4 = "pipeline/model/gpt.py", "data_prep/steps/c4.py"
    files = sources({gpt: "\n\ndef _planted():\n    from torch import distributed\n    import mlflow\n",
                     c4: "\n\ndef _planted():\n    from data_prep.steps import fineweb\n"})
    lines = len(files[gpt].splitlines())
    assert dependency_problems(files) == [
        f"{gpt}:{lines - 1} imports torch.distributed",
        f"{gpt}:{lines} imports mlflow: only pipeline/tracking/ may ({ONLY_IN['mlflow'][1]})"]
    assert step_problems(files) == [f"{c4}:{len(files[c4].splitlines())} imports data_prep.steps.fineweb"]


# --------------------------------------------------------------------------- import cycles


def is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def import_graph(files: dict[str, str]) -> dict[str, dict[str, tuple[int, str]]]:
    """{file: {file it runs on import: (line, dotted module)}}. Importing `a.b.c` runs a/__init__.py and
    a/b/__init__.py too, except the importer's own packages (they ran before it). Imports under
    `if TYPE_CHECKING:` never run and are left out; imports inside functions are in."""
    graph: dict[str, dict[str, tuple[int, str]]] = {}
    for here, text in files.items():
        skipped = {line for node in ast.walk(ast.parse(text, here))
                   if isinstance(node, ast.If) and is_type_checking(node.test)
                   for inner in node.body for line in range(inner.lineno, inner.end_lineno + 1)}
        mine = {"/".join(here.split("/")[:n]) + "/__init__.py" for n in range(1, here.count("/") + 1)}
        edges = graph.setdefault(here, {})
        for line, module in imports(here, text):
            parts = module.split(".")
            for n in range(1, len(parts) + 1):
                target = module_file(".".join(parts[:n]))
                if line not in skipped and target and target != here and target not in mine:
                    edges.setdefault(target, (line, ".".join(parts[:n])))
    return graph


def import_cycles(files: dict[str, str]) -> list[str]:
    """One line per circle of modules that import each other (each strongly connected part of the graph,
    shown as its shortest circle through its first file): `a.py:3 imports b -> b.py:9 imports a`."""
    graph = import_graph(files)
    found = []
    for part in strongly_connected(graph):
        ring = shortest_ring(graph, set(part), part[0])
        found.append(" -> ".join(f"{a}:{graph[a][b][0]} imports {graph[a][b][1]}" for a, b in itertools.pairwise(ring)))
    return found


def shortest_ring(graph: dict[str, dict], part: set[str], start: str) -> list[str]:
    """[start, ..., start]: breadth first inside `part`, so the first way back to start is a shortest one."""
    before: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        for w in graph[v]:
            if w == start:
                ring = [v]
                while before[ring[-1]] is not None:
                    ring.append(before[ring[-1]])
                return [*reversed(ring), start]
            if w in part and w not in before:
                before[w] = v
                queue.append(w)
    raise AssertionError(f"{start}: no way back inside its own strongly connected part")


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm: the parts of more than one file, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
            if len(part) > 1:
                parts.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(parts)


def test_no_import_cycles():
    """No module of data_prep or pipeline reaches itself through imports, within a layer as well as across.
    A lazy import inside a function counts: it defers the circle to run time, the design still has it."""
    assert import_cycles(sources()) == []


BACK = "\n\ndef _back():\n    from pipeline.plot import plot\n"  # plan.py -> plot.py, lazily: no circle alone


def test_the_cycle_check_catches_a_planted_circle_inside_one_layer():
    """plan.py and plot.py share a layer, so the layer rule allows both imports; together they are a circle."""
    files = sources({"pipeline/plan.py": BACK, "pipeline/plot.py": "\n\ndef _planted():\n    from pipeline.plan import make_plan\n"})
    plan, plot = (len(files[f].splitlines()) for f in ("pipeline/plan.py", "pipeline/plot.py"))
    assert import_cycles(files) == [f"pipeline/plan.py:{plan} imports pipeline.plot -> pipeline/plot.py:{plot} imports pipeline.plan"]


def test_the_cycle_check_catches_a_circle_through_many_files():
    files = sources({"pipeline/config.py": "\n\ndef _planted():\n    import pipeline.cli\n"})
    cycles = import_cycles(files)
    assert len(cycles) == 1 and f"pipeline/config.py:{len(files['pipeline/config.py'].splitlines())} imports pipeline.cli" in cycles[0]


def test_an_import_that_never_runs_is_no_circle():
    files = sources({"pipeline/plan.py": BACK, "pipeline/plot.py": "\n\nif TYPE_CHECKING:\n    from pipeline.plan import make_plan\n"})
    assert import_cycles(files) == []


def family_checks(files: dict[str, str]) -> list[str]:
    """`x.style == "..."` (or !=, in) anywhere but in the family specs: where a family's difference leaks out."""
    found = []
    for path, text in files.items():
        if path.startswith("pipeline/families/"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(x, ast.Attribute) and x.attr == "style" for x in sides):
                    found.append(f"{path}:{node.lineno}")
    return found


def test_no_family_name_checks_outside_the_specs():
    bench = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "bench").glob("*.py"))}
    assert family_checks({**sources(), **bench}) == []
    planted = family_checks(sources({"pipeline/model/gpt.py": "\nbias = cfg.style == 'gpt2'\n"}))
    assert planted == [f"pipeline/model/gpt.py:{sources()['pipeline/model/gpt.py'].count(chr(10)) + 2}"]
