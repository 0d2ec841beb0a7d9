"""What every post-training stage shares: reading the parent MODEL, sampling windows, lineage, sizes.

Each stage (quantize, distill, prune) reads one parent MODEL directory and writes
a new one whose config.json says where it came from (`kiln` lineage meta), so
`kiln lineage` and tracking can walk the chain back to the corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import KilnError
from pipeline.data.corpus import PreparedCorpus, Windows
from pipeline.model.io import TOKENIZER, load_model_dir, sha256_file
from pipeline.model.weights import weights_file


def model_path(ref: str | Path) -> Path:
    """A MODEL reference as a local directory (registry URIs are resolved by `kiln fetch` first)."""
    if str(ref).startswith("models:/"):
        raise KilnError(f"{ref}: registry URIs are not resolved here; run `kiln fetch {ref} --out DIR` and pass DIR")
    path = Path(ref)
    if not (path / "config.json").exists():
        raise KilnError(f"{path}: not a MODEL directory (no config.json)")
    return path


def load_parent(ref: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict, Path]:
    path = model_path(ref)
    model, config = load_model_dir(path, device=device)
    return model, config, path


def lineage(parent: Path, stage: str, method: str, **extra) -> dict:
    """The `kiln` block of config.json: stage, parent path and the sha256 of the parent's weights."""
    return {"kiln": {"stage": stage, "parent_model": str(parent), "parent_sha256": sha256_file(parent / weights_file(parent)),
                     "method": method, **extra}}


def parent_tokenizer(parent: Path) -> Path | None:
    tok = parent / TOKENIZER
    return tok if tok.exists() else None


# --------------------------------------------------------------------------- data


def windows(data_dir: str | Path, split: str, block_size: int) -> Windows:
    return Windows(PreparedCorpus(data_dir).stream(split), block_size)


def stack(win: Windows, indices) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.stack([win[int(i)] for i in indices]))
    return rows[:, :-1], rows[:, 1:]


def batch_at(win: Windows, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The global batch of `step` depends only on (seed, step): resuming or changing the process count
    does not change which windows are seen. Each rank takes its slice."""
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(0, len(win), size=batch_size * world)
    return stack(win, idx[rank * batch_size:(rank + 1) * batch_size])


class WindowsTask:
    """Plain language-model training for pipeline/post/loop.py: random windows of a prepared corpus's train
    split, the batch of a step drawn from (seed, step) alone (`batch_at`)."""

    def __init__(self, data_dir: str | Path, block_size: int, micro_batch: int, accum: int, seed: int,
                 identity: dict | None = None):
        self.win, self.micro, self.accum, self.seed = windows(data_dir, "train", block_size), micro_batch, accum, seed
        self.identity = identity

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict]:
        x, y = batch_at(self.win, step, self.micro * self.accum, self.seed, rank, world)
        return [{"x": xm, "y": ym} for xm, ym in zip(x.chunk(self.accum), y.chunk(self.accum), strict=True)]

    def loss(self, model, batch: dict):
        return model(batch["x"], batch["y"])[1], {}

    def tokens(self, batch: dict) -> int:
        return batch["y"].numel()


def train_steps(model: torch.nn.Module, data_dir: str | Path, steps: int, lr: float = 1e-3, batch_size: int = 8,
                seed: int = 0, min_lr: float | None = None, warmup: int = 0, weight_decay: float = 0.0,
                grad_clip: float = 1.0, masks: dict[str, torch.Tensor] | None = None, betas=(0.9, 0.95),
                checkpoints: str | Path | None = None, every: int = 100, keep: int = 3,
                identity: dict | None = None) -> list[float]:
    """Train `model` in place on random windows for `steps` steps of the post-training loop (cosine to
    `min_lr`, lr/10 by default): pruning's recovery, and the from-scratch baselines distillation and
    quantization are measured against. Returns every step's loss (those before a resume too)."""
    from pipeline.config import TrainConfig
    from pipeline.post import loop

    torch.manual_seed(seed)
    train = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup_steps=warmup,
                        weight_decay=weight_decay, grad_clip=grad_clip, beta1=betas[0], beta2=betas[1],
                        micro_batch_size=batch_size, grad_accum=1, seed=seed, log_every=max(1, steps))
    task = WindowsTask(data_dir, model.cfg.block_size, batch_size, 1, seed, identity)
    return loop.run(model, task, train, checkpoints=Path(checkpoints) if checkpoints else None, every=every,
                    keep=keep, masks=masks).losses


def calib_tokens(data_dir: str | Path, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """N calibration windows (train split), drawn without replacement when the split has enough."""
    win = windows(data_dir, "train", seq_len)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(win))[:n] if n <= len(win) else rng.integers(0, len(win), size=n)
    return stack(win, idx)[0]


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside transformer blocks, by state-dict prefix (e.g. `blocks.0.attn.wq`)."""
    return {f"blocks.{i}.{name}": m for i, block in enumerate(model.blocks)
            for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


# --------------------------------------------------------------------------- sizes (perplexity: pipeline/evaluate.py)


def size_on_disk(path: str | Path) -> int:
    """Bytes of a MODEL directory's weights (its .safetensors files): what quantization and pruning change.
    Config, tokenizer files and checksums are the same small overhead for every form of a model."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors") if p.is_file())


def nonzero_params(model: torch.nn.Module) -> int:
    """Unique parameters that are not exactly zero (what pruning removes)."""
    unique = {id(p): p for p in model.parameters()}.values()
    # torchao int8 weights are tensor subclasses without count_nonzero: count their codes
    return int(sum(torch.count_nonzero(getattr(p, "qdata", p).detach()).item() for p in unique))
