"""Wheels for what the GPU image lacks: built here (`make gpu-wheels`), installed there (`make bench-gpu`).

The GPU machine has Python 3.12 and torch (+ triton, transformers, accelerate, sentencepiece,
safetensors) and no network. Kiln's training path also imports DeepSpeed, pydantic, rich, yaml...
`build` puts one wheel of each (the versions pinned in constraints.txt) in .gpu-wheels/:
DeepSpeed as `pip wheel --no-deps` (a py3-none-any build), the rest downloaded as cp312
manylinux x86_64 (or pure Python) wheels. `install` (on the GPU machine) installs from that
folder, offline, only the ones the image lacks (or has in a version another of them refuses), into
.gpu-site/ (no system or PEP 668 issue), which the benchmark's processes put after the image's own
site-packages, so the image's numpy, packaging... are never shadowed. `check` (the dry run, on CPU) confirms the
folder holds a wheel of every one and that pip, offline, would install them on the target.

    python -m bench.gpu_wheels [DIR]   # build
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
SITE = ROOT / ".gpu-site"  # where `install` puts them: the image's own site-packages stay as they are
PYTHON, PLATFORMS = "3.12", ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# What `pipeline.train` imports beyond the image (deepspeed and its requirements, Kiln's config and console).
# The dry run checks this list covers every distribution the measured code loaded (bench/gpu.py).
NEEDS = ("deepspeed", "hjson", "ninja", "py-cpuinfo", "msgpack", "psutil", "einops", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "typing-extensions", "PyYAML", "rich", "markdown-it-py", "mdurl",
         "Pygments", "numpy", "packaging", "tqdm")
IMAGE = ("torch", "triton", "transformers", "accelerate", "sentencepiece", "safetensors")  # shared/FACTS.md


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """{normalized name: version} from constraints.txt: the one place versions are chosen."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[norm(name)] = version.strip()
    return pins


def requirements() -> list[str]:
    pins = pinned()
    missing = [n for n in NEEDS if norm(n) not in pins]
    if missing:
        raise SystemExit(f"constraints.txt: no pinned version for {', '.join(missing)}")
    return [f"{n}=={pins[norm(n)]}" for n in NEEDS]


def image_closure() -> set[str]:
    """The image's packages and everything they require (read from this machine's metadata)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [norm(n) for n in IMAGE]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": "", "python_version": PYTHON}):
                todo.append(norm(r.name))
    return seen


def build(dest: Path = WHEELS) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = requirements()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), reqs[0]], check=True)  # deepspeed: built
    target = ["--only-binary=:all:", "--python-version", PYTHON] + [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([*pip, "download", "--no-deps", *target, "-d", str(dest), *reqs[1:]], check=True)
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    errors = check(dest)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(reqs)} wheels in {dest}" if not errors else "gpu-wheels: incomplete", file=sys.stderr)
    return 1 if errors else 0


def wheel_for(dest: Path, requirement: str) -> Path | None:
    name, version = requirement.split("==")
    for path in dest.glob("*.whl"):
        w_name, w_version, *_ = path.name.split("-")
        if norm(w_name) == norm(name) and w_version == version:
            return path
    return None


def check(dest: Path = WHEELS) -> list[str]:
    """One-line errors: a requirement without its wheel, or pip refusing to install the set for the
    target (Python 3.12, manylinux x86_64) offline. Empty when the folder is ready."""
    if not dest.is_dir():
        return [f"{dest}: no wheel folder (run `make gpu-wheels` on a machine with network)"]
    reqs = requirements()
    errors = [f"{dest}: no wheel for {r}" for r in reqs if wheel_for(dest, r) is None]
    if errors:
        return errors
    target = ["--only-binary=:all:", "--python-version", PYTHON] + [a for p in PLATFORMS for a in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                               "--find-links", str(dest), "--target", tmp, *target, *reqs],
                              capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return [f"{dest}: pip would not install the wheels for Python {PYTHON}: {last}"]
    return []


def declared(dest: Path) -> dict[str, list[str]]:
    """{normalized name: [specifier, ...]} that the folder's wheels require of each other (their METADATA)."""
    from email.parser import HeaderParser

    from packaging.requirements import Requirement

    specs: dict[str, list[str]] = {}
    for wheel in sorted(dest.glob("*.whl")) if dest.is_dir() else []:
        with zipfile.ZipFile(wheel) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = z.read(meta).decode("utf-8", "replace") if meta else ""
        for line in HeaderParser().parsestr(text).get_all("Requires-Dist") or []:
            r = Requirement(line)
            if r.specifier and (r.marker is None or r.marker.evaluate({"extra": "", "python_version": PYTHON})):
                specs.setdefault(norm(r.name), []).append(str(r.specifier))
    return specs


def to_install(dest: Path) -> tuple[list[str], list[str]]:
    """(missing, refused): the needed distributions this Python lacks, and those it has in a version another
    needed one refuses. A version older than the pin that nothing refuses is the image's own and stays:
    installing over it would shadow it."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version  # pip and transformers both need it: always on the image

    specs = declared(dest)
    missing, refused = [], []
    for req in requirements():
        name = req.split("==")[0]
        try:
            have = Version(md.version(name))
        except md.PackageNotFoundError:
            missing.append(req)
            continue
        if not all(have in SpecifierSet(s) for s in specs.get(norm(name), [])):
            refused.append(req)
    return missing, refused


def install(dest: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Install from `dest`, offline, what `to_install` names: the missing into `site`, which the measuring
    processes put after the image's own packages, the refused into `site`-over, put before them
    (bench/gpu_contender.py). Returns their requirements."""
    for path, at in ((site, len(sys.path)), (over(site), 0)):  # as the measuring processes will see them,
        if str(path) not in sys.path:  # so a second run finds what the first installed
            sys.path.insert(at, str(path))
    missing, refused = to_install(dest)
    for folder, reqs in ((site, missing), (over(site), refused)):
        if reqs:
            _install_into(dest, folder, reqs)
    return missing + refused


def over(site: Path) -> Path:
    return site.with_name(site.name + "-over")


def _install_into(dest: Path, site: Path, reqs: list[str]) -> None:
    if not dest.is_dir():
        raise RuntimeError(f"{dest}: no wheel folder; missing {', '.join(reqs)} (run `make gpu-wheels`)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
                           "--target", str(site), "--find-links", str(dest), *reqs])
    if proc.returncode:  # no pip on the image, or pip refused: a wheel is a zip laid out for site-packages
        print(f"pip exited {proc.returncode}; unpacking the wheels into {site} instead", file=sys.stderr)
        for req in reqs:
            wheel = wheel_for(dest, req)
            if wheel is None:
                raise RuntimeError(f"{dest}: no wheel for {req} (run `make gpu-wheels`)")
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)


if __name__ == "__main__":
    sys.exit(build(Path(sys.argv[1]) if len(sys.argv) > 1 else WHEELS))
