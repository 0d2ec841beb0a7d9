"""The second audit's attacks (issue 30): a stranger with write access to a shared registry, a corpus, a
MODEL dir or a shared folder, through the real `kiln` commands. Each test reproduces one attack and
proves the refusal; docs/security.md lists them. `pytest -m security` selects them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_security import ROOT, SECRET, model_dir, one_error

pytestmark = pytest.mark.security


# --------------------------------------------------------------------------- 3. the --out lock


@pytest.mark.parametrize("planted", ["lock", "out"])
def test_a3_a_planted_symlink_at_the_out_lock_is_not_followed(tmp_path, capsys, planted):
    """A shared parent: the lock file (or --out itself) is a symlink to another user's file."""
    from pipeline.cli import main

    victim = tmp_path / "victims_file"
    victim.write_bytes(SECRET)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / (".out.kiln-lock" if planted == "lock" else "out")).symlink_to(victim)
    code = main(["quantize", str(model_dir(tmp_path / "m")), "--method", "rtn", "--group-size", "0",
                 "--out", str(shared / "out"), "--set", "tracking.enabled=false"])
    assert victim.read_bytes() == SECRET
    assert code == 1
    assert "is a symlink; refusing to follow it" in one_error(capsys.readouterr().err)
