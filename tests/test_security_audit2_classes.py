"""The second audit's classes of defect (issue 30) where the first round left them open: a config's
`extends:` from a shared folder, YAML merge keys, Parquet dictionaries, and a download larger than the
free space (credentials on the nodes' command line: test_security_audit2.py, beside the launch it
shares). Through the real `kiln` commands; docs/security.md lists them. `pytest -m security` selects them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_security import SECRET, one_error
from test_security_audit2 import no_hang

pytestmark = pytest.mark.security


# --------------------------------------------------------------------------- config extends:


def shared_folder(tmp_path: Path) -> Path:
    """A folder anyone can write (like /tmp or a team scratch dir) holding a config someone left there."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


@pytest.mark.parametrize(("planted", "where"), [("symlink", "shared"), ("dotdot", "shared"), ("fifo", "shared"),
                                                ("fifo", "own")])
def test_c1_extends_in_a_shared_folder_is_confined(tmp_path, capsys, planted, where):
    """`kiln train --config shared/x.yaml`: what x.yaml extends is chosen by whoever wrote the folder, so it may
    not leave it (a link to, or `../` of, the victim's file) nor be a FIFO (the read hung); a config of the
    user's own may extend `../` (the shipped configs do) but a FIFO is refused there too."""
    from pipeline.cli import main

    victims = tmp_path / "victim"
    victims.mkdir()
    (victims / "private.yaml").write_bytes(b"model: {n_layer: 3}\n# " + SECRET + b"\n")
    folder = shared_folder(tmp_path) if where == "shared" else tmp_path / "mine"
    folder.mkdir(exist_ok=True)
    name = {"symlink": "base.yaml", "dotdot": "../victim/private.yaml", "fifo": "base.yaml"}[planted]
    if planted == "symlink":
        (folder / "base.yaml").symlink_to(victims / "private.yaml")
    elif planted == "fifo":
        os.mkfifo(folder / "base.yaml")
    config = folder / "x.yaml"
    config.write_text(f"extends: {name}\ntrain: {{steps: 1}}\n")
    with no_hang():
        code = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    line = one_error(capsys.readouterr().err)
    why = {"symlink": "symlink", "dotdot": "contains '..'", "fifo": "not a regular file"}
    assert code == 2 and f"{config}: extends:" in line and why[planted] in line, line
    assert SECRET.decode() not in line


def test_c1_extends_reads_a_bounded_number_of_files(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "leaf.yaml").write_text("train: {steps: 1}\n")
    for i in range(20):  # a chain: c0 extends c1 extends ... c19 extends leaf
        (tmp_path / f"c{i}.yaml").write_text(f"extends: {f'c{i + 1}' if i < 19 else 'leaf'}.yaml\n")
    assert main(["train", "--config", str(tmp_path / "c0.yaml"), "--out", str(tmp_path / "run")]) == 2
    line = one_error(capsys.readouterr().err)
    assert "extends: more than 16 files for one config" in line, line


def merge_bomb(levels: int, fan: int = 10) -> str:
    """Each level's mapping merges the previous one `fan` times (`<<: [*l4, *l4, ...]`): PyYAML copies every
    merged pair into a list before building the dict, so level n costs fan**n pairs although every mapping
    ends up with `fan` keys (which is all a count of the finished data sees)."""
    text = "l0: &l0 {" + ", ".join(f"k{i}: {i}" for i in range(fan)) + "}\n"
    for n in range(1, levels + 1):
        text += f"l{n}: &l{n} {{<<: [" + ", ".join([f"*l{n - 1}"] * fan) + "]}\n"
    return text


def test_c2_yaml_merge_keys_are_bounded_while_parsing(tmp_path, capsys):
    """470 bytes of merge keys stand for a million pairs (an unfixed Kiln spent minutes building them, then
    accepted the config; nine levels would exhaust memory): the merges are counted as they are made."""
    from pipeline.cli import main

    bomb = tmp_path / "merge.yaml"
    bomb.write_text(merge_bomb(6))
    assert bomb.stat().st_size < 500
    with no_hang():
        code = main(["train", "--config", str(bomb), "--out", str(tmp_path / "run")])
    line = one_error(capsys.readouterr().err)
    assert code == 2 and "expands to more than 100,000 values" in line, line


# --------------------------------------------------------------------------- a download larger than the disk


def test_c2_a_download_is_refused_when_it_does_not_fit_the_free_space(registry, tmp_path, capsys, monkeypatch):
    """Registered files larger than the free space at `--out` (a stranger can register a large model under an
    alias you fetch): `kiln fetch` refuses before the first byte, in one line, and leaves nothing behind.
    The disk is made small by `shutil.disk_usage` answering 1 KB free, as a full disk would."""
    import shutil
    from collections import namedtuple

    from test_security import model_dir, publish

    from pipeline.cli import main

    publish(registry, model_dir(tmp_path / "real", seed=13), "roomy")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage(1 << 40, (1 << 40) - 1024, 1024))
    fetches = tmp_path / "fetches"
    code = main(["fetch", "models:/roomy@champion", "--out", str(fetches / "out"), "--tracking-uri", registry.uri])
    line = one_error(capsys.readouterr().err)
    assert code == 1 and "more than the 1,024 bytes free at" in line and "refusing to download them" in line, line
    assert list(fetches.iterdir()) == []
