"""Run `kiln ...` in this process while recording peak RSS and wall time per training phase.

Used by bench/scale_rehearsal.py as the torchrun worker: `torchrun ... bench/_rss_probe.py OUT.json train ...`.
A thread samples /proc/self/statm every few milliseconds; phases are marked by wrapping the
training functions (engine build, one step, one checkpoint save, writing the MODEL dir), so the
figures come from the real `kiln train` code path, not a stand-in.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
STATE = {"phases": ["start"], "peak": {}, "anon_peak": {}, "seconds": {}, "local_params": None, "first_step_s": None}


def rss(anon: bool = False) -> int:
    """Resident bytes; `anon`: less the file-backed ones (pages of mapped files read, e.g. safetensors: the
    kernel drops them under pressure, so they are cache, not memory the process needs)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - (int(fields[2]) if anon else 0)) * PAGE


def sample() -> None:
    while True:
        value, anon = rss(), rss(anon=True)
        for phase in STATE["phases"][1:] or ["start"]:  # a nested phase (build inside init) counts for both
            if value > STATE["peak"].get(phase, 0):
                STATE["peak"][phase] = value
            if anon > STATE["anon_peak"].get(phase, 0):
                STATE["anon_peak"][phase] = anon
        time.sleep(0.002)


def phase(name: str, fn):
    """Wrap fn so that, while it runs, samples count towards `name` (and its wall time is added)."""

    def wrapped(*args, **kwargs):
        STATE["phases"].append(name)
        STATE["peak"][name] = max(STATE["peak"].get(name, 0), rss())
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STATE["seconds"][name] = STATE["seconds"].get(name, 0.0) + time.perf_counter() - t0
            STATE["peak"][name] = max(STATE["peak"][name], rss())
            STATE["phases"].pop()

    return wrapped


def install() -> None:
    import pipeline.parallel.engine as engine
    import pipeline.train as train

    init = engine.Engine.__init__

    def engine_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        STATE["local_params"] = sum(p.numel() for p in self.engine.module.parameters())
        if getattr(self.engine, "zero_optimization_partition_weights", lambda: False)():
            STATE["local_params"] = sum(getattr(p, "ds_tensor", p).numel() for p in self.engine.module.parameters())

    engine.Engine.__init__ = phase("init", engine_init)
    if hasattr(engine, "build_gpt"):  # the model alone, before DeepSpeed's optimizer state
        import pipeline.parallel.pipeline_module as pipe

        engine.build_gpt = phase("build", engine.build_gpt)
        pipe.build_pipeline_module = phase("build", pipe.build_pipeline_module)
    step = phase("step", engine.Engine.train_step)

    def train_step(self, *args, **kwargs):
        if STATE["first_step_s"] is None:  # seconds from process start to the first training step
            STATE["first_step_s"] = time.perf_counter() - T0
        return step(self, *args, **kwargs)

    engine.Engine.train_step = train_step
    train.save_checkpoint = phase("checkpoint", train.save_checkpoint)
    if hasattr(train, "save_model_dir"):
        train.save_model_dir = phase("model_dir", train.save_model_dir)
    if hasattr(train, "save_model_dir_parallel"):  # every rank writes its shard
        train.save_model_dir_parallel = phase("model_dir", train.save_model_dir_parallel)
    if hasattr(train, "write_model_dir"):
        train.write_model_dir = phase("model_dir", train.write_model_dir)


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    threading.Thread(target=sample, daemon=True).start()

    def dump() -> None:
        record = {"rank": int(os.environ.get("RANK", "0")), "peak_bytes": STATE["peak"],
                  "anon_peak_bytes": STATE["anon_peak"], "seconds": STATE["seconds"],
                  "local_params": STATE["local_params"], "first_step_s": STATE["first_step_s"]}
        with open(f"{out}.rank{record['rank']}", "w") as f:
            json.dump(record, f)

    atexit.register(dump)
    install()
    from pipeline.cli import main as kiln

    code = kiln(argv)
    dump()
    sys.exit(code)


if __name__ == "__main__":
    main()
