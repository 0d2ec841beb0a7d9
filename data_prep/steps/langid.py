"""Language identification with py3langid (its model ships inside the wheel: no download).

Records `meta["lang"]` and `meta["lang_score"]`. With `langs`, the recorded
language is the best one among `langs` (choosing among a few candidates is far
more accurate than among 97), and a document is removed as `lang` when the
probability mass on `langs` is below `threshold` — a Japanese page is not kept
just because "de" beat "en" for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache

import numpy as np

from data_prep.document import Document
from data_prep.steps.base import Step


@lru_cache(maxsize=1)
def _model():
    """The identifier, loaded once per process (0.4 s); read-only afterwards, so sharing is safe."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LangId(Step):
    name = "lang"

    def __init__(self, langs: list[str] | None = None, threshold: float = 0.5, max_chars: int = 1000):
        super().__init__()
        self.model = _model()
        labels = list(self.model.nb_classes)
        unknown = sorted(set(langs or []) - set(labels))
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; py3langid knows {len(set(labels))}, e.g. en, de, zh")
        self.langs = list(dict.fromkeys(langs)) if langs else None
        self.labels = labels
        self.wanted = np.array([lab in set(self.langs or []) for lab in labels])
        self.threshold, self.max_chars = threshold, max_chars

    def classify(self, text: str) -> tuple[str, float, float, str]:
        """(language, its probability, probability mass on the wanted languages, overall top language)."""
        probs = self.model._decide(text[: self.max_chars])  # one pass: all classes' probabilities
        top = int(probs.argmax())
        if self.langs is None:
            return self.labels[top], float(probs[top]), 1.0, self.labels[top]
        i = int(np.where(self.wanted, probs, -1.0).argmax())
        mass = float(probs[self.wanted].sum())
        return self.labels[i], float(probs[i] / mass) if mass > 0 else 0.0, mass, self.labels[top]

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                lang, score, mass, top = self.classify(doc.text)
                doc.meta["lang"], doc.meta["lang_score"] = lang, round(score, 4)
                if self.langs is not None and mass < self.threshold:
                    doc.remove("lang", f"p({','.join(self.langs)})={mass:.2f} < {self.threshold}; most likely {top}")
            yield doc
