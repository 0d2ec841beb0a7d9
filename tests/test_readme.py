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
