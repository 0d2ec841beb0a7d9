"""Unicode NFC, control characters out, whitespace tidied (indentation kept: code is text too)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.steps.base import Step

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_RUNS = re.compile(r"(?<=\S)[ \t]{2,}")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _INNER_RUNS.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


class Normalize(Step):
    name = "normalize"

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                doc.text = normalize_text(doc.text)
                if not doc.text:
                    doc.remove("normalize:empty", "nothing left after removing control characters")
            yield doc
