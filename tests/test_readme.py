"""README promises that must stay true: the two commands, and a config reference matching the schemas."""

import re
from pathlib import Path

from pipeline.config import reference_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_config_reference_matches_schema():
    block = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", README, re.S)
    assert block, "README lost its configuration reference markers"
    assert block.group(1) == reference_markdown(), "regenerate: python -c 'from pipeline.config import reference_markdown; print(reference_markdown())'"


def test_two_commands_up_front():
    head = README[: README.index("## Status")]
    assert "make demo" in head and "make test" in head


def named_tests(section: str) -> list[tuple[str, str]]:
    """(file, test) for every `tests/x.py::name` (and a following `::other`) in a README section."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found, current = [], None
    for path, name in re.findall(r"`(?:tests/(\w+)\.py)?::(\w+)", body):
        current = path or current
        found.append((current, name))
    return found


def markers(module: str, name: str) -> set[str]:
    import importlib

    mod = importlib.import_module(module)
    func = getattr(mod, name)
    def listed(obj) -> list:
        marks = getattr(obj, "pytestmark", [])
        return marks if isinstance(marks, list) else [marks]

    return {m.name for m in [*listed(func), *listed(mod)]}


def test_the_reliability_and_security_tables_name_tests_their_marker_selects():
    """`pytest -m fault` runs every test §Reliability names; `pytest -m security` every test §Security names."""
    for section, marker in (("Reliability", "fault"), ("Security", "security")):
        named = named_tests(section)
        assert len(named) > 10, section
        missing = [f"tests/{f}.py::{n}" for f, n in named if marker not in markers(f, n)]
        assert missing == [], f"README §{section} names tests that `-m {marker}` does not select: {missing}"
