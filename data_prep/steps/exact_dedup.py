"""Exact duplicates: a 64-bit hash of the normalized text; the earliest document of each group stays.

`group_min` works on hash/uid arrays so the runner can apply it bucket by
bucket across partitions (data_prep/buckets.py).
"""

from __future__ import annotations

import numpy as np

from data_prep.steps.text import sorted_groups


def group_min(keys: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every key shared by several uids: (non-minimal uids, the minimal uid of their group)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, head, starts = sorted_groups(keys, uids)
    return u[~starts], head[~starts]


