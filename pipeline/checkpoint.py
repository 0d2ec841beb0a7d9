"""Checkpoints that survive kill -9 and scale: every rank writes and hashes its own files, nothing is gathered.

    OUT/checkpoints/step_0000100/
        ds/                            DeepSpeed engine state (model shards, optimizer, ZeRO partitions)
        weights/rank_NNNNN.safetensors this rank's slices of the plain weights, their slicing recorded
                                       (pipeline/model/weights.py reassembles any tensor on demand)
        kiln_state.json                step, consumed samples, config, data digests, layout, code commit
        rng/rank_NNNNN.json            python / numpy / torch RNG states of every rank
        SHA256SUMS                     every file above; each rank hashed what it wrote while writing it
    OUT/checkpoints/latest             the name of the last complete checkpoint, for people and tools

Everything is written under `.tmp-step_…` and renamed only after every rank has finished, so
a directory named step_* is always complete. A resume takes the newest checkpoint whose
checksums verify, checked once and in parallel (each rank hashes its share of the files);
a broken one is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.confine import read_confined
from pipeline.config import KilnError, first_line
from pipeline.console import log
from pipeline.model.io import (
    SMALL_FILE_MAX,
    check_sums,
    load_checked,
    load_safetensors,
    read_sums,
    sha256_file,
    unique_state_dict,
    weights_only_loads,
    write_sums,
)
from pipeline.model.weights import SHARDS_DIR, WEIGHTS, DictWeights, Weights, open_weights, save_weights
from pipeline.parallel.topology import raise_first
from pipeline.provenance import git_commit

STATE = "kiln_state.json"
OPTIMIZER = "optimizer.pt"  # TorchState's optimizer state (tensors and numbers only)
LATEST = "latest"
RANK_SUMS = ".sums"  # per-rank digests, merged into SHA256SUMS by rank 0
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
    """Write `path` whole: a new temp file next to it (O_EXCL|O_NOFOLLOW, so a link planted at the temp
    name is never followed), then a rename over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # ours from a killed run with the same pid, or planted: removed, not opened
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, 0o644), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_hashed(path: Path, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(engine, root: Path, step: int, state: dict, keep: int) -> Path | None:
    """Collective: every rank writes (and hashes) its own files; rank 0 merges the sums and publishes.
    Returns the path on rank 0."""
    root = Path(root)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / RANK_SUMS).mkdir()
    _barrier()
    written = engine.save(tmp)
    rng = f"rng/rank_{rank:05d}.json"
    written[rng] = _write_hashed(tmp / rng, json.dumps(rng_state()))
    _atomic_write(tmp / RANK_SUMS / f"rank_{rank:05d}", json.dumps(written))
    _barrier()
    if rank != 0:
        _barrier()
        return None
    known: dict[str, str] = {}
    for part in sorted((tmp / RANK_SUMS).iterdir()):
        known.update(json.loads(part.read_text()))
    shutil.rmtree(tmp / RANK_SUMS)
    known[STATE] = _write_hashed(tmp / STATE, json.dumps({**state, "step": step, "code_commit": git_commit()},
                                                         indent=2) + "\n")
    write_sums(tmp, known)  # files DeepSpeed wrote outside its checkpoint engine (a helper script) are hashed here
    if final.exists():  # the same step saved again (a rerun after the rename, before `latest`)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    for old in step_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# --------------------------------------------------------------------------- find / verify / load


def step_dirs(root: str | Path) -> list[Path]:
    """The step_N directories under root, highest step first (by number: step_10000000 > step_9999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def weights_only(name: str) -> bool:
    """The files that consolidation reads (export, init_from): the weight slices and the state."""
    return name.startswith(f"{SHARDS_DIR}/") or name in (WEIGHTS, STATE)


def _my_share(path: Path, entries: dict[str, str], rank: int, world: int) -> dict[str, str]:
    """Split the files to hash over the ranks, balanced by size, the same way on every rank."""
    sizes = sorted(((path / n).stat().st_size if (path / n).is_file() else 0, n) for n in entries)
    load, mine = [0] * world, {}
    for size, name in reversed(sizes):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine[name] = entries[name]
    return mine


def verify(path: str | Path, only=None, collective: bool = False) -> None:
    """Raise KilnError unless every file SHA256SUMS lists (those `only(name)` accepts) verifies.
    `collective`: every rank calls it and hashes its share; all raise the same first problem."""
    path = Path(path)
    rank, world = (_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    problem = None
    try:
        entries = {k: v for k, v in read_sums(path).items() if only is None or only(k)}
        check_sums(path, _my_share(path, entries, rank, world))
    except (KilnError, OSError, ValueError) as err:
        problem = first_line(err)
    raise_first(problem, world)


def newest_complete(root: str | Path, only=None, collective: bool = False) -> Path | None:
    """The newest checkpoint whose checksums verify; warns about each broken one it skips.

    Newest by step, not by the `latest` pointer: a save killed after its rename but before the pointer
    moved left a complete checkpoint that the pointer does not name yet. `only`: verify just those files
    (consolidation reads the weights, not the optimizer state)."""
    for path in step_dirs(root):
        try:
            verify(path, only, collective)
            read_state(path)
            return path
        except KilnError as err:
            if _rank() == 0 or not collective:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", path, err)
    return None


def find_checkpoint(root: str | Path, collective: bool = False) -> Path | None:
    """For a resume (before any rank writes): drop interrupted saves, take the newest complete checkpoint
    (verified once, in parallel when `collective`) and make `latest` name it, so export and init_from
    see what training resumed from."""
    root = Path(root)
    if _rank() == 0:
        for tmp in root.glob(".tmp-step_*"):  # a save that was interrupted
            shutil.rmtree(tmp, ignore_errors=True)
    if collective:
        _barrier()
    path = newest_complete(root, collective=collective)
    if _rank() == 0 and path is not None and _pointer(root) != path.name:
        _atomic_write(root / LATEST, path.name + "\n")
    return path


def _pointer(root: Path) -> str | None:
    """What the `latest` pointer names (None: absent or not a small regular file); it is only compared."""
    try:
        return read_confined(root, LATEST, f"{root}:", 4096).decode(errors="replace").strip()
    except (OSError, KilnError):
        return None


def read_state(path: str | Path) -> dict:
    path = Path(path) / STATE
    try:
        return json.loads(read_confined(path.parent, STATE, f"{path.parent}:", SMALL_FILE_MAX))
    except FileNotFoundError:
        raise KilnError(f"{path}: cannot read checkpoint state (not found)") from None
    except (OSError, ValueError) as err:
        raise KilnError(f"{path}: cannot read checkpoint state ({type(err).__name__})") from None


def pretrain_meta(state: dict, tokenizer: str | Path | None, **extra) -> dict:
    """The `kiln` block of a pretrained MODEL's config.json, from the state of the checkpoint it comes from:
    what `kiln train` writes at the end and `kiln export` writes from any checkpoint, built here only."""
    digests = state.get("data_digests")
    return {"kiln": {"stage": "pretrain", "step": state["step"], "data_digests": digests,
                     "data_digest": (digests or [None])[0],
                     "tokenizer_sha256": sha256_file(tokenizer) if tokenizer else None,
                     "git_commit": state.get("code_commit"), "train_config": state["config"], **extra}}


def load_weights(path: str | Path, verified: bool = False) -> Weights:
    """The plain weights of a checkpoint dir (sharded or old) or a MODEL dir, read lazily, tensor by tensor.
    Checks the files it will read against SHA256SUMS unless the caller has (`verified`)."""
    path = Path(path)
    if not verified:
        verify(path, weights_only)  # read_sums refuses a directory without SHA256SUMS
    return open_weights(path)


def restore_rng(path: Path) -> None:
    name = f"rng/rank_{_rank():05d}.json"
    try:
        set_rng_state(json.loads(read_confined(path, name, f"{path}:", SMALL_FILE_MAX)))
    except FileNotFoundError:
        pass


def trim_metrics(path: Path, step: int) -> None:
    """On resume drop metrics.jsonl lines logged after the checkpoint (they will be logged again) and a
    torn last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # the process died while writing this line
    path.write_text("".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------- plain PyTorch (distill, prune recovery)


class TorchState:
    """The `engine` save_checkpoint takes, for one plain module and its optimizer (one process, or data
    parallel where every rank holds the same state): rank 0 writes the weights (model.safetensors, read
    like an old-layout checkpoint) and the optimizer state, each hashed as it is written; every rank's
    RNG is written by save_checkpoint. `load` restores both from a verified checkpoint."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, directory: Path) -> dict[str, str]:
        if _rank() != 0:
            return {}
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        return {WEIGHTS: save_weights(DictWeights(unique_state_dict(self.model)), directory / WEIGHTS,
                                      {"format": "pt"}, dtype=None),
                OPTIMIZER: _write_hashed(directory / OPTIMIZER, buf.getvalue())}

    def load(self, path: Path) -> None:
        load_checked(self.model, load_safetensors(path / WEIGHTS), path / WEIGHTS)
        with weights_only_loads(path / OPTIMIZER, []):
            self.optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=True))
