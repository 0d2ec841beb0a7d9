"""The prep schema: filters as a list checked against the step registry, one-line errors naming the key,
and the layer rule: data_prep (below pipeline) imports nothing from pipeline, its steps neither ray nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from data_prep.steps import STEPS
from pipeline.config import ConfigError, load_config


@pytest.mark.fault
@pytest.mark.parametrize("override,message", [
    ("filters=[c4,c5]", "filters.1: 'c5' is not one of langid,gopher_repetition,gopher_quality,c4,fineweb,pii"),
    ("filters={c4: false}", "filters: a list of step names now"),
    ("filters=[c4,c4]", "a step is listed twice"),
    ("filter_disable=[c4:nope]", "filter_disable: 'c4:nope' is not a rule; known: c4:lorem_ipsum"),
    ("filter_disable=[curly_bracket]", "filter_disable: 'curly_bracket' is not a rule"),
    ("filter_enable=[c4:terminal]", "filter_enable: 'c4:terminal' is not a rule; known: c4:lorem_ipsum"),
    ("filter_params={c5: {}}", "filter_params.c5.[key]: 'c5' is not one of"),
    ("filter_params={c4: {nope: 1}}", "filter_params: c4: unknown parameter(s) ['nope']"),
    ("langs=[en]", None),
    ("minhash.threshold=1.5", "minhash.threshold: 1.5: Input should be less than or equal to 1"),
    ("boilerplate.unit=word", "boilerplate.unit: 'word' is not one of line,paragraph"),
])
def test_prep_config_errors_name_the_key_in_one_line(override, message):
    if message is None:  # langs needs langid among the filters
        load_config("prep", None, [override])
        with pytest.raises(ConfigError, match="langs: needs langid in filters"):
            load_config("prep", None, [override, "filters=[c4]"])
        return
    with pytest.raises(ConfigError) as err:
        load_config("prep", None, [override])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_shipped_prep_configs_list_their_filters(root):
    demo = load_config("prep", root / "configs/prep/demo.yaml")
    assert demo.filters == ["langid", "gopher_repetition", "gopher_quality", "c4", "pii"]
    assert demo.filter_params["gopher_quality"]["min_words"] == 20
    assert load_config("prep", root / "configs/prep/default.yaml").filters == list(STEPS)


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_data_prep_imports_nothing_from_pipeline(root):
    """On the source (no import of pipeline) tests/test_architecture.py checks it; here the steps' own
    dependencies, and at run time."""
    files = sorted((root / "data_prep").rglob("*.py"))
    assert len(files) > 20
    heavy = {str(p.relative_to(root)): sorted(n for n in _imports(p) if n.split(".")[0] in ("ray", "torch"))
             for p in (root / "data_prep" / "steps").glob("*.py")}
    assert {k: v for k, v in heavy.items() if v} == {}
    # and at run time: importing all of data_prep loads no pipeline module (nothing sneaks in indirectly)
    mods = ", ".join(f"data_prep.{p.relative_to(root / 'data_prep').with_suffix('').as_posix().replace('/', '.')}"
                     for p in files if p.name != "__init__.py")
    code = f"import sys, importlib; [importlib.import_module(m) for m in [{', '.join(repr(m) for m in mods.split(', '))}]]; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
