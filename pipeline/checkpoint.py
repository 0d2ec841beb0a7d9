"""Checkpoints that survive kill -9: temp dir + rename, checksums, a `latest` pointer.

    OUT/checkpoints/step_0000100/
        ds/                  DeepSpeed engine state (model shards, optimizer, ZeRO partitions)
        model.safetensors    the consolidated plain weights (any layout can start from them)
        kiln_state.json      step, consumed samples, config, data digests, code commit, elapsed
        rng/rank_NNNNN.json  python / numpy / torch RNG states of every rank
        SHA256SUMS
    OUT/checkpoints/latest   the name of the last complete checkpoint, for people and tools

Everything is written under `.tmp-step_…` and renamed only after every rank has
finished, so a directory named step_* is always complete; a checkpoint whose
checksums do not match is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipeline.config import KilnError
from pipeline.console import log
from pipeline.model.io import load_safetensors, verify_sums, write_sums
from pipeline.provenance import git_commit

STATE = "kiln_state.json"
WEIGHTS = "model.safetensors"
LATEST = "latest"
_STEP = re.compile(r"step_(\d+)")


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# --------------------------------------------------------------------------- save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(engine, root: Path, step: int, state: dict, keep: int) -> Path | None:
    """Collective: every rank writes its DeepSpeed shard; rank 0 publishes. Returns the path on rank 0."""
    root = Path(root)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    (tmp / "rng" / f"rank_{_rank():05d}.json").write_text(json.dumps(rng_state()))
    weights = engine.consolidated_state()
    _barrier()
    if _rank() != 0:
        _barrier()
        return None
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / STATE).write_text(json.dumps({**state, "step": step, "code_commit": git_commit()}, indent=2) + "\n")
    write_sums(tmp)
    if final.exists():  # the same step saved again (a rerun after the rename, before `latest`)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    for old in step_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# --------------------------------------------------------------------------- find / load


def step_dirs(root: str | Path) -> list[Path]:
    """The step_N directories under root, highest step first (by number: step_10000000 > step_9999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(root: str | Path) -> Path | None:
    """The newest checkpoint whose checksums verify (read-only); warns about each broken one it skips.

    Newest by step, not by the `latest` pointer: a save killed after its rename but before the pointer
    moved left a complete checkpoint that the pointer does not name yet."""
    for path in step_dirs(root):
        try:
            verify_sums(path)
            json.loads((path / STATE).read_text())
            return path
        except (KilnError, OSError, ValueError) as err:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path, err)
    return None


def find_checkpoint(root: str | Path) -> Path | None:
    """For a resume (rank 0, before any rank writes): drop interrupted saves, take the newest complete
    checkpoint and make `latest` name it, so export and init_from see what training resumed from."""
    root = Path(root)
    for tmp in root.glob(".tmp-step_*"):  # a save that was interrupted
        shutil.rmtree(tmp, ignore_errors=True)
    path = newest_complete(root)
    pointer = root / LATEST
    if path is not None and (not pointer.exists() or pointer.read_text().strip() != path.name):
        _atomic_write(pointer, path.name + "\n")
    return path


def read_state(path: str | Path) -> dict:
    path = Path(path) / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KilnError(f"{path}: cannot read checkpoint state ({err})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated plain weights of a checkpoint dir or a MODEL dir (safetensors only)."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise KilnError(f"{path}: no {WEIGHTS}; expected a checkpoint or MODEL directory")
    verify_sums(path)
    return load_safetensors(path / WEIGHTS)


def restore_rng(path: Path) -> None:
    rng = Path(path) / "rng" / f"rank_{_rank():05d}.json"
    if rng.exists():
        set_rng_state(json.loads(rng.read_text()))
