"""`kiln eval SRC --tasks LIST`: lm-evaluation-harness tasks on a Kiln MODEL or a transformers dir.

Tasks are looked up in Kiln's own task directory (pipeline/harness/tasks: offline, built from
text that ships with Python), then in `--include-path` dirs, then in lm-eval's catalogue (hub
datasets: they need the network, or the datasets cache). A Kiln MODEL runs through KilnLM,
i.e. exactly as Kiln serves it (int8 on torchao, GPTQ from its codes); a transformers dir
(`kiln fetch --format hf`, `kiln export --format hf`) runs through lm-eval's own `hf` model.

Each task reports its metrics and a dataset record: name, a digest over the documents actually
scored (lm-eval's per-document hashes, in order) and their count, for MLflow's dataset inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import ConfigError, KilnError

TASKS_DIR = Path(__file__).with_name("tasks")


@contextmanager
def quiet_git():
    """lm-eval records `git describe --always` of the working directory in its results, and git says "fatal: not
    a git repository" on stderr wherever that is not one. The same call with git's stderr discarded (lm-eval
    falls back to its own lookup either way); nothing else of lm-eval's is touched."""
    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise KilnError("kiln eval --tasks needs lm-evaluation-harness: pip install 'kiln-pretrain[eval]'") from None


def task_manager(tasks: list[str], include_path: list[str] | None = None, trusted: list[str] | None = None):
    """Kiln's tasks and the task directories first; lm-eval's own catalogue only when a task is not there
    (indexing it costs seconds) or when directories are given (a name they define must be new:
    pipeline/harness/includes.py says what a directory may do)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    from pipeline.harness.includes import check_collisions, check_untrusted

    dirs = {f"--include-path {p}": Path(p).resolve() for p in include_path or []}
    dirs |= {f"--trusted-include-path {p}": Path(p).resolve() for p in trusted or []}
    for flag, path in dirs.items():
        if not path.is_dir():
            raise ConfigError(f"{flag}: not a directory")
        if flag.startswith("--include-path"):
            check_untrusted(path)
    paths = [str(TASKS_DIR), *map(str, dirs.values())]
    if dirs:
        import lm_eval.tasks

        named = {"Kiln's tasks": TASKS_DIR, "lm-eval's catalogue": Path(lm_eval.tasks.__file__).parent, **dirs}
        check_collisions({src: set(TaskIndex.build([path])) for src, path in named.items()})
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (not in {TASKS_DIR.name}/, "
                          f"--include-path or lm-eval's catalogue)")
    return manager


def make_lm(model_dir: Path, batch_size: int, device: str):
    """KilnLM for a Kiln MODEL dir, lm-eval's HFLM for a transformers dir."""
    from pipeline.model.io import read_config

    config = read_config(model_dir) if (model_dir / "config.json").is_file() else {}  # confined, bounded
    if "model_type" in config:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(model_dir), device=device, batch_size=batch_size, trust_remote_code=False)
    from pipeline.harness.lm import KilnLM
    from pipeline.model.io import TOKENIZER, load_model_dir

    if not (model_dir / TOKENIZER).is_file():
        raise KilnError(f"{model_dir / TOKENIZER}: not found; lm-eval tasks need the model's tokenizer")
    model, _ = load_model_dir(model_dir, device=device)
    return KilnLM(model, model_dir / TOKENIZER, batch_size=batch_size, device=device)


def flatten(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": s, "alias": ...}} -> {task: {"acc": v, ...}}."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            if metric == "sample_len":  # a count, not a measurement
                continue
            row[metric if filt in ("", "none") else f"{metric}.{filt}"] = float(value)
        out[task] = row
    return out


def datasets(res: dict) -> dict[str, dict]:
    """Per task: the documents scored, as a dataset record (digest over lm-eval's doc hashes)."""
    out = {}
    for task, samples in (res.get("samples") or {}).items():
        h = hashlib.sha256()
        for s in samples:
            h.update(str(s.get("doc_hash") or json.dumps(s.get("doc"), sort_keys=True, default=str)).encode())
        cfg = (res.get("configs") or {}).get(task, {})
        source = cfg.get("dataset_path") or "custom"
        out[task] = {"name": task, "digest": h.hexdigest(), "docs": len(samples), "source": str(source),
                     "output_type": cfg.get("output_type")}
    return out


def run_tasks(model_dir: str | Path, tasks: list[str], include_path: list[str] | None = None,
              limit: float | None = None, batch_size: int = 8, device: str | None = None,
              num_fewshot: int | None = None, trusted_include_path: list[str] | None = None,
              apply_chat_template: bool = False) -> dict:
    """{"results": {task: {metric: value}}, "datasets": {task: record}, "n_samples": {...}}."""
    _import_lm_eval()
    from lm_eval import simple_evaluate

    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit}: must be positive (a count, or a fraction below 1)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # lm-eval narrates every task it builds
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from pipeline.harness.includes import sandbox_templates

    manager = task_manager(tasks, include_path, trusted_include_path)
    sandbox_templates()
    lm = make_lm(Path(model_dir), batch_size, device)
    with quiet_git():
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=True, bootstrap_iters=0, batch_size=batch_size,
                              apply_chat_template=apply_chat_template)
    if res is None:
        raise KilnError("lm-eval returned no results")
    return {"results": flatten(res["results"]), "datasets": datasets(res), "n_samples": res.get("n-samples", {}),
            "versions": {k: str(v) for k, v in (res.get("versions") or {}).items()}}
