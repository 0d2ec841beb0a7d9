"""`make bench`: run every bench/*.py, collect their JSON lines, save bench/results/<name>.json.

Each benchmark prints lines {"bench", "value", "unit", "reference", "ratio"} where the
reference was measured in the same run; this runner adds the machine description.
    python -m bench                 # all
    python -m bench train prep      # those whose file name contains a word
    python -m bench gpu [--dry-run] # the one-command GPU benchmark (bench/gpu.py; not part of "all")
    python -m bench time_to_quality [--steps 1500 --data DIR ...]  # with its own options (bench/time_to_quality.py)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def append_result(results: Path, name: str, record: dict) -> str:
    """One bench's record as a JSON line appended to RESULTS/NAME.jsonl (made if missing), and printed."""
    results.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record)
    with open(results / f"{name}.jsonl", "a") as f:
        f.write(line + "\n")
    print(line, flush=True)
    return line


def main(words: list[str]) -> int:
    if words[:1] == ["gpu"]:
        from bench import gpu

        return gpu.main(words[1:])
    if words[:1] == ["time_to_quality"]:
        from bench import time_to_quality

        return time_to_quality.main(words[1:])
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith(("_", "gpu")))
    if words:
        scripts = [p for p in scripts if any(w in p.stem for w in words)]
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    failed = []
    for path in scripts:
        print(f"# {path.name}", file=sys.stderr, flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=HERE.parent)
        lines = []
        for line in proc.stdout.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "bench" in record:
                lines.append(record)
                print(line, flush=True)
        if proc.returncode:
            failed.append(path.name)
            print(proc.stderr[-3000:], file=sys.stderr)
        out = {"script": path.name, "machine": machine(), "wall_s": round(time.time() - start, 1),
               "returncode": proc.returncode, "results": lines, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (results_dir / f"{path.stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
