"""What a `kiln train` can refuse before any process starts.

`kiln launch` runs `preflight` on every node before torchrun / deepspeed / srun start a
single rank, so a wrong layout, a missing corpus, mixed tokenizers, a vocab too small or a
changed model shape is one line in seconds, not a traceback from every rank of a job that
waited hours in a queue. Training itself runs the same checks (`check_vocab`, `check_resume`).
Read-only: nothing here writes to --out (other nodes may already be running).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import read_state, step_dirs
from pipeline.config import ConfigError, KilnError, ModelConfig, RunConfig, first_line, validate_world
from pipeline.data.sampler import open_corpora


def check_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")


def check_resume(cfg: RunConfig, checkpoint: Path, state: dict, digests: list[str]) -> None:
    """A checkpoint continues only the run it came from: same model shape, same data."""
    try:  # fields the checkpoint predates take their defaults (a new field at its default changes nothing)
        saved = ModelConfig.model_validate(state.get("config", {}).get("model", {})).shape()
    except ValueError as exc:
        raise KilnError(f"{checkpoint}: its model config does not read as one ({first_line(exc)})") from None
    now = cfg.model.shape()
    changed = [k for k in now if saved[k] != now[k]]
    if changed:
        diff = ", ".join(f"model.{k} {saved[k]} -> {now[k]}" for k in changed)
        raise KilnError(f"{checkpoint}: the model shape changed since this checkpoint ({diff}); resuming needs the "
                        "same shape (use a new --out; train.init_from takes weights of the same shape)")
    if state.get("data_digests") != digests:
        raise KilnError(f"{checkpoint}: trained on data {state.get('data_digests')}, but data.paths now hold "
                        f"{digests}; use a new --out")


def newest_state(out: str | Path | None) -> tuple[Path, dict] | None:
    """The newest readable kiln_state.json under OUT/checkpoints (checksums are left to the resume itself)."""
    for path in step_dirs(Path(out) / "checkpoints") if out else []:
        try:
            return path, read_state(path)
        except KilnError:
            continue
    return None


def preflight(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError / KilnError (one line) for a run that cannot work at this world size."""
    validate_world(cfg, world_size)
    corpora = open_corpora(cfg.data, verify=False)
    check_vocab(cfg, corpora[0].vocab_size)
    if cfg.model.vocab_size is None:  # as training does: the tokenizer's size
        cfg.model.vocab_size = corpora[0].vocab_size
    found = newest_state(cfg.out)
    if found:
        check_resume(cfg, *found, [c.digest for c in corpora])
