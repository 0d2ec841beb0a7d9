"""The one-command GPU benchmark: its wheel folder check, and the whole run in --dry-run mode on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu, gpu_wheels

ROOT = Path(__file__).resolve().parent.parent


def fake_wheels(dest: Path, odd: dict[str, str] | None = None, reqs: list[str] | None = None,
                requires: dict[str, list[str]] | None = None) -> Path:
    """A minimal wheel (metadata only) for every requirement; `odd` gives some another tag than py3-none-any,
    `requires` some Requires-Dist lines."""
    dest.mkdir(parents=True, exist_ok=True)
    for req in reqs or gpu_wheels.requirements():
        name, version = req.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        w_tag = (odd or {}).get(name, "py3-none-any")
        with zipfile.ZipFile(dest / f"{stem}-{w_tag}.whl", "w") as z:
            info = f"{stem}.dist-info"
            deps = "".join(f"Requires-Dist: {d}\n" for d in (requires or {}).get(name, []))
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{deps}")
            z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {w_tag}\n")
            z.writestr(f"{info}/RECORD", "")
    return dest


def test_requirements_are_pinned_by_constraints():
    reqs = dict(r.split("==") for r in gpu_wheels.requirements())
    assert reqs["deepspeed"] == gpu_wheels.pinned()["deepspeed"] and len(reqs) == len(gpu_wheels.NEEDS)


def test_check_accepts_a_complete_folder_and_names_what_is_missing(tmp_path):
    folder = fake_wheels(tmp_path / "w")
    assert gpu_wheels.check(folder) == []
    hjson = next(folder.glob("hjson-*.whl"))
    hjson.unlink()
    assert gpu_wheels.check(folder) == [f"{folder}: no wheel for {gpu_wheels.requirements()[1]}"]
    assert "no wheel folder" in gpu_wheels.check(tmp_path / "absent")[0]


def test_check_refuses_a_wheel_for_another_python(tmp_path):
    # pydantic-core built for this machine's Python 3.11 would not install on the GPU image's 3.12
    folder = fake_wheels(tmp_path / "w", odd={"pydantic-core": "cp311-cp311-manylinux_2_17_x86_64"})
    problems = gpu_wheels.check(folder)
    assert len(problems) == 1 and "would not install" in problems[0], problems


def test_install_keeps_the_image_own_versions_unless_a_needed_wheel_refuses_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    # absent; deepspeed as pinned; pytest newer than a pin of 1.0; pluggy older than a pin of 99.0 (the image's
    # own: kept), iniconfig older than a pin of 99.0 and refused by the absent one's `iniconfig>=50`
    reqs = ["kiln-absent-dep==1.0", gpu_wheels.requirements()[0], "pytest==1.0", "pluggy==99.0", "iniconfig==99.0"]
    monkeypatch.setattr(gpu_wheels, "requirements", lambda: reqs)
    folder = fake_wheels(tmp_path / "w", reqs=reqs, requires={"kiln-absent-dep": ["iniconfig>=50"]})
    site = tmp_path / "site"
    assert gpu_wheels.install(folder, site) == ["kiln-absent-dep==1.0", "iniconfig==99.0"]
    assert (site / "kiln_absent_dep-1.0.dist-info").is_dir() and not list(site.glob("pluggy*"))
    assert (gpu_wheels.over(site) / "iniconfig-99.0.dist-info").is_dir()  # found before the image's own
    assert gpu_wheels.install(folder, site) == []  # found where it was put: nothing to do on a second run


def test_install_unpacks_the_wheels_when_pip_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    reqs = ["kiln-absent-dep==1.0"]
    monkeypatch.setattr(gpu_wheels, "requirements", lambda: reqs)
    monkeypatch.setattr(gpu_wheels.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    folder, site = fake_wheels(tmp_path / "w", reqs=reqs), tmp_path / "site"
    assert gpu_wheels.install(folder, site) == reqs
    assert (site / "kiln_absent_dep-1.0.dist-info" / "METADATA").is_file()


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_bench_gpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu", "--dry-run", "--steps", "3", "--out", str(out),
                           "--wheels", str(fake_wheels(tmp_path / "w"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = lines(out)
    assert doc[0]["run"]["dry_run"] and doc[0]["run"]["machine"]["python"] and doc[-1]["summary"]["errors"] == 0
    assert {"device": "cpu (dry run)"}.items() <= doc[-1]["summary"]["machine"].items()
    imported = next(d["imported"] for d in doc if "imported" in d)
    assert "deepspeed" in imported["gpu_tiny_kiln_train"]
    records = [d for d in doc if "bench" in d]
    figures = {r["bench"]: r for r in records}
    printed = [json.loads(line)["bench"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == [r["bench"] for r in records]  # each printed as it came, all of them in the file
    assert [n for n in figures if n.endswith("_tokens_per_s")][0] == "gpu_tiny_kiln_train_tokens_per_s"
    assert figures["gpu_matmul_peak"]["value"] > 0
    for name in gpu.CONTENDERS:
        assert figures[f"gpu_tiny_{name}_tokens_per_s"]["value"] > 0
        assert figures[f"gpu_tiny_{name}_mfu_vs_measured_peak"]["value"] > 0
        assert figures[f"gpu_tiny_{name}_loss"]["value"] < figures[f"gpu_tiny_{name}_loss"]["first"]  # it learned
    for ref in gpu.CONTENDERS[1:]:
        assert figures[f"gpu_tiny_kiln_train_vs_{ref}"]["ratio"] > 0
        assert abs(figures[f"gpu_tiny_kiln_train_loss_vs_{ref}"]["ratio"] - 1) <= gpu.LOSS_TOLERANCE


def results(tmp_path: Path) -> gpu.Results:
    return gpu.Results(tmp_path / "r.jsonl", {"test": True}, dry=False)


def test_a_part_that_dies_keeps_the_figures_it_printed(tmp_path):
    r = results(tmp_path)
    figure = {"bench": "gpu_1.3b_kiln_train_tokens_per_s", "value": 1.0}
    code = f"import json, os; print(json.dumps({figure!r}), flush=True); os._exit(3)"
    gpu.run_part("gpu_1.3b_kiln_train", [sys.executable, "-c", code], 300, r, {})
    assert lines(r.path)[1:] == [figure, {"bench": "gpu_1.3b_kiln_train", "error": "process exited 3"}]


def test_a_part_that_overruns_its_share_is_stopped_and_said(tmp_path, capsys):
    r = results(tmp_path)
    gpu.run_part("gpu_124m_nanogpt_compiled", [sys.executable, "-c", "import time; time.sleep(600)"], 1, r, {})
    [line] = lines(r.path)[1:]
    assert line["error"] == "stopped after 1 s (its share of the time budget)"
    assert json.loads(capsys.readouterr().out) == line  # the same line printed


def loss(r: gpu.Results, contender: str, first: float, last: float) -> None:
    r.write({"bench": f"gpu_1.3b_{contender}_loss", "value": last, "first": first})
    r.write({"bench": f"gpu_1.3b_{contender}_tokens_per_s", "value": 100.0})


@pytest.mark.parametrize("kiln, ok", [((10.8, 7.1), True), ((10.8, 7.6), False), ((7.2, 7.1), False),
                                      ((10.8, float("nan")), False)],
                         ids=["close", "loss-off", "does-not-learn", "nan"])
def test_the_loss_check_fails_a_fast_wrong_step(tmp_path, kiln, ok):
    r = results(tmp_path)
    loss(r, "kiln_train", *kiln)
    loss(r, "kiln_gpt_compiled", 10.8, 7.0)
    gpu.compare("1.3b", "kiln_gpt_compiled", r)
    names = [x["bench"] for x in r.records]
    assert "gpu_1.3b_kiln_train_vs_kiln_gpt_compiled" in names and "gpu_1.3b_kiln_train_loss_vs_kiln_gpt_compiled" in names
    assert ("gpu_1.3b_kiln_train_loss_check" not in names) == ok
