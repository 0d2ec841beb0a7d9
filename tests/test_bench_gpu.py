"""The one-command GPU benchmark: its wheel folder check, and the whole run in --dry-run mode on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_wheels

ROOT = Path(__file__).resolve().parent.parent


def fake_wheels(dest: Path, odd: dict[str, str] | None = None, reqs: list[str] | None = None) -> Path:
    """A minimal wheel (metadata only) for every requirement; `odd` gives some another tag than py3-none-any."""
    dest.mkdir(parents=True, exist_ok=True)
    for req in reqs or gpu_wheels.requirements():
        name, version = req.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        w_tag = (odd or {}).get(name, "py3-none-any")
        with zipfile.ZipFile(dest / f"{stem}-{w_tag}.whl", "w") as z:
            info = f"{stem}.dist-info"
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
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


def test_install_puts_only_what_is_missing_into_the_site_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    # absent; deepspeed as pinned; pytest newer than a pin of 1.0; pluggy older than a pin of 99.0
    reqs = ["kiln-absent-dep==1.0", gpu_wheels.requirements()[0], "pytest==1.0", "pluggy==99.0"]
    monkeypatch.setattr(gpu_wheels, "requirements", lambda: reqs)
    folder, site = fake_wheels(tmp_path / "w", reqs=reqs), tmp_path / "site"
    assert gpu_wheels.install(folder, site) == ["kiln-absent-dep==1.0", "pluggy==99.0"]
    assert (site / "kiln_absent_dep-1.0.dist-info").is_dir()
    assert gpu_wheels.install(folder, site) == []  # found in the site folder now: nothing to do


def test_install_unpacks_the_wheels_when_pip_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    reqs = ["kiln-absent-dep==1.0"]
    monkeypatch.setattr(gpu_wheels, "requirements", lambda: reqs)
    monkeypatch.setattr(gpu_wheels.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    folder, site = fake_wheels(tmp_path / "w", reqs=reqs), tmp_path / "site"
    assert gpu_wheels.install(folder, site) == reqs
    assert (site / "kiln_absent_dep-1.0.dist-info" / "METADATA").is_file()


@pytest.mark.slow
def test_bench_gpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu", "--dry-run", "--steps", "1", "--out", str(out),
                           "--wheels", str(fake_wheels(tmp_path / "w"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] and doc["errors"] == [] and "deepspeed" in doc["setup"]["124m_imported"]
    assert doc["machine"]["device"] == "cpu (dry run)" and doc["machine"]["python"]
    figures = {r["bench"]: r for r in doc["results"]}
    printed = [json.loads(line)["bench"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(printed) == sorted(figures)  # one JSON line per figure, all of them in the file
    assert figures["gpu_matmul_peak"]["value"] > 0
    for name in ("kiln_train", "kiln_gpt_compiled", "nanogpt_compiled"):
        assert figures[f"gpu_tiny_{name}_tokens_per_s"]["value"] > 0
        assert figures[f"gpu_tiny_{name}_mfu_vs_measured_peak"]["value"] > 0
    assert figures["gpu_tiny_kiln_train_tokens_per_s"]["ratio"] > 0
    assert figures["gpu_tiny_kiln_train_vs_nanogpt"]["ratio"] > 0


def test_a_part_without_time_left_is_reported_not_run(capsys):
    from bench import gpu

    records: list = []
    gpu.run_part("1.3b", [], time.time() + 5, records, {})
    assert len(records) == 1 and records[0]["error"].startswith("skipped: ") and records[0]["bench"] == "gpu_1.3b"
    assert json.loads(capsys.readouterr().out) == records[0]  # the same line printed


def test_a_contender_that_fails_mid_run_stops_and_says_why(capsys):
    from bench import gpu

    calls = []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    g = gpu.Guarded("gpu_1.3b_nanogpt_compiled", step, dry=True)
    for _ in range(4):
        g()
    assert g.failed and len(calls) == 2  # not called again after the failure
    line = json.loads(capsys.readouterr().out)
    assert line == {"bench": "gpu_1.3b_nanogpt_compiled", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
