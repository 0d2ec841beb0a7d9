"""Promises of the README and docs/ that must stay true: the two set-up commands, a short README listing every
subcommand, links that resolve, a configuration reference matching the schemas, and test tables whose markers
select what they name."""

import re
from pathlib import Path

from pipeline.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The body of `## heading`, up to the next `## ` heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, `\\` continuations joined."""
    commands, pending = [], ""
    for line in block.splitlines():
        line = pending + re.sub(r"(^|\s)#.*$", "", line).strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].strip() + " "
        elif line:
            commands.append(line.removeprefix("$ "))
    return commands


def test_config_reference_matches_schema():
    block = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", doc("configuration.md"), re.S)
    assert block, "docs/configuration.md lost its configuration reference markers"
    assert block.group(1) == reference_markdown(), "regenerate: python -c 'from pipeline.config import reference_markdown; print(reference_markdown())'"


def test_the_two_commands_are_the_only_set_up():
    """Before §Status the README sets up with `make demo` and `make test`, in §Two commands, and nothing else:
    no code block comes before that section, and the first real run installs nothing."""
    head = README[: README.index("\n## Status\n")]
    assert "\n## Two commands\n" in head
    before, rest = head.split("\n## Two commands\n", 1)
    assert code_blocks(before) == [], "a code block before §Two commands"
    setup = section(README, "Two commands")
    assert [c for block in code_blocks(setup) for c in shell_commands(block)] == ["make demo", "make test"]
    after = rest[len(setup):]
    for command in (c for block in code_blocks(after) for c in shell_commands(block)):
        assert not re.match(r"(make|pip|pip3|python3? -m (pip|venv)|uv|conda|apt(-get)?)\b", command), \
            f"a set-up command outside §Two commands: {command}"


def test_readme_is_short():
    assert len(README.splitlines()) <= 250, "README.md is the newcomer's page: move detail into docs/"


def test_readme_lists_every_subcommand_once():
    from pipeline.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    listed = re.findall(r"^\| `kiln (\w+)` \|", section(README, "Commands"), re.M)
    assert sorted(listed) == sorted(subcommands), "one row per `kiln` subcommand in README §Commands"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercased, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def test_every_relative_link_resolves():
    """Every `[text](target)` in README.md and docs/*.md that is not a URL names a file of this repository
    (and, with `#anchor`, a heading of that file)."""
    broken = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.is_relative_to(ROOT) or not dest.exists():
                broken.append(f"{where} names no file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} names no heading of {dest.relative_to(ROOT)}")
    assert broken == []


def named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every `tests/x.py::name` (and a following `::other`) in a document."""
    found, current = [], None
    for path, name in re.findall(r"`(?:tests/(\w+)\.py)?::(\w+)", text):
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
    """`pytest -m fault` runs every test docs/reliability.md names; `pytest -m security` every test docs/security.md names."""
    for name, marker in (("reliability.md", "fault"), ("security.md", "security")):
        named = named_tests(doc(name))
        assert len(named) > 10, name
        missing = [f"tests/{f}.py::{n}" for f, n in named if marker not in markers(f, n)]
        assert missing == [], f"docs/{name} names tests that `-m {marker}` does not select: {missing}"
