"""Loss masks and packing for supervised fine-tuning, as pure functions (the training loop only calls them).

A rendered conversation (pipeline/chat.py) becomes an example: its ids as input, and as targets the next id
where that id is learned, IGNORE elsewhere. `completion_only` learns the assistant's content and the <|end|>
closing each assistant turn (what the model must produce); `all` learns every next id. The last id of a
conversation has no target, so a target never points into the next conversation of a packed row.

Examples are packed into rows of `block_size` ids, in order (a row is closed when the next example does not
fit; the rest is padding, never learned). In a row, a conversation must not see the ones before it, and
must look the same to the model as it would alone. The model does that from each position's segment
(pipeline/model/layers.py `Packing`): positions restart at 0 per conversation, and attention is causal within
one conversation (a block-diagonal causal mask). A packed row's summed loss is then the sum of its
conversations' losses computed one by one (tests/test_sft_packing.py, through Kiln's GPT: it fails when
attention may cross or a position is shifted). Document masking was chosen over position resets alone
(which leak across conversations) and over one row per conversation (padding): bench/sft_packing_cost.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE = -100  # a target the loss skips (torch's cross_entropy ignore_index, as pipeline/model uses)
LossOn = Literal["completion_only", "all"]


def targets(ids: list[int], assistant: list[bool], loss_on: LossOn = "completion_only") -> list[int]:
    """Per input position, the next id when it is learned, else IGNORE; the last position has none."""
    if len(ids) != len(assistant):
        raise ValueError(f"{len(ids)} ids but {len(assistant)} assistant flags")
    learned = [True] * len(ids) if loss_on == "all" else assistant
    return [nxt if keep else IGNORE for nxt, keep in zip(ids[1:], learned[1:], strict=True)] + [IGNORE][:len(ids)]


@dataclass(frozen=True)
class Row:
    """One packed row: inputs, targets and the conversation each position belongs to (padding: -1)."""

    ids: list[int]
    targets: list[int]
    segments: list[int]


def pack(examples: list[tuple[list[int], list[int]]], block_size: int, pad_id: int) -> list[Row]:
    """(ids, targets) pairs, each at most `block_size` long, into rows of exactly `block_size`, in order."""
    rows: list[Row] = []
    ids: list[int] = []
    tgt: list[int] = []
    seg: list[int] = []

    def close():
        pad = block_size - len(ids)
        rows.append(Row(ids + [pad_id] * pad, tgt + [IGNORE] * pad, seg + [-1] * pad))

    for i, (x, y) in enumerate(examples):
        if not 0 < len(x) <= block_size or len(x) != len(y):
            raise ValueError(f"example {i}: {len(x)} ids and {len(y)} targets for rows of {block_size}")
        if len(ids) + len(x) > block_size:
            close()
            ids, tgt, seg = [], [], []
        n = (seg[-1] + 1) if seg else 0
        ids, tgt, seg = ids + list(x), tgt + list(y), seg + [n] * len(x)
    if ids:
        close()
    return rows


def tensors(rows: list[Row]) -> dict[str, torch.Tensor]:
    """Rows as a batch: ids, targets and segments (what GPT(ids, targets, segments=...) takes)."""
    return {"ids": torch.tensor([r.ids for r in rows]), "targets": torch.tensor([r.targets for r in rows]),
            "segments": torch.tensor([r.segments for r in rows])}
