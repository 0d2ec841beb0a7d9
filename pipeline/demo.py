"""`kiln demo`: the whole pipeline on a corpus built from Python's own documentation.

Until every stage exists this runs what does and fails loudly naming what is
missing — a demo that pretends is worse than none.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.config import KilnError
from pipeline.console import log

# stage -> (module that implements it, issue that delivers it)
STAGES = {
    "prep": ("data_prep.runner", "prep"),
    "train": ("pipeline.train", "train"),
    "quantize": ("pipeline.post.quantize", "post"),
    "distill": ("pipeline.post.distill", "post"),
    "register": ("pipeline.tracking", "tracking"),
    "fetch": ("pipeline.tracking", "tracking"),
    "eval": ("pipeline.evaluate", "tracking"),
    "generate": ("pipeline.generate", "tracking"),
}


def missing_stages() -> list[str]:
    return [stage for stage, (module, _) in STAGES.items() if importlib.util.find_spec(module) is None]


def run_demo(out: str | Path = "demo_out") -> dict:
    from data_prep.demo_corpus import write_demo_corpus
    from pipeline.cli import ISSUES

    out = Path(out)
    paths = write_demo_corpus(out / "corpus")
    size = sum(p.stat().st_size for p in paths)
    log.info("demo corpus: %d files, %.1f MB in %s", len(paths), size / 1e6, out / "corpus")
    missing = missing_stages()
    if missing:
        todo = sorted({ISSUES[STAGES[s][1]] for s in missing})
        raise KilnError(f"demo stopped after building the corpus; missing stages: {', '.join(missing)} — " + "; ".join(todo))
    raise KilnError("demo: all stages exist but the end-to-end driver is not written yet (issue 9)")
