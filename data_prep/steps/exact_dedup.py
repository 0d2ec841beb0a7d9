"""Exact duplicates: a 64-bit hash of the normalized text; the earliest document of each group stays.

`group_min` works on hash/uid arrays so the runner can apply it bucket by
bucket across partitions; `ExactDedup` does the same within one stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from data_prep.document import Document
from data_prep.steps.base import Step
from data_prep.steps.text import sorted_groups, text_hash


def group_min(keys: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every key shared by several uids: (non-minimal uids, the minimal uid of their group)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, head, starts = sorted_groups(keys, uids)
    return u[~starts], head[~starts]



class ExactDedup(Step):
    name = "exact_dup"

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        first: dict[int, str] = {}
        for doc in docs:
            if doc.removed is None:
                h = doc.meta["hash"] = text_hash(doc.text)
                if h in first:
                    doc.remove("exact_dup", first[h])
                else:
                    first[h] = doc.id
            yield doc
