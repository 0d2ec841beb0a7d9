"""A real, offline corpus for the demo and tests: text that ships with Python and its packages.

`pydoc_data.topics` holds the Language Reference topics (~0.7 MB of English prose);
docstrings of the standard library add ~0.3 MB and the long descriptions (READMEs)
of installed packages ~1.6 MB. No download; the same bytes wherever the same
Python and pinned packages are installed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Modules whose import has side effects (GUI, antigravity opens a browser, this prints).
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "lib2to3", "ensurepip"}


def pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]


def stdlib_docstrings(min_chars: int = 200) -> Iterator[tuple[str, str]]:
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name in _SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules simply do not contribute
            continue
        doc = inspect.getdoc(module)
        if doc and len(doc) >= min_chars:
            yield f"module:{name}", doc
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) >= min_chars:
                yield f"doc:{name}.{attr}", doc
            if inspect.isclass(obj):  # methods carry much of the library's prose
                for meth, fn in sorted(vars(obj).items()):
                    doc = inspect.getdoc(fn) if inspect.isfunction(fn) and not meth.startswith("_") else None
                    if doc and len(doc) >= min_chars:
                        yield f"doc:{name}.{attr}.{meth}", doc


def package_descriptions(min_chars: int = 500) -> Iterator[tuple[str, str]]:
    """The README each installed distribution carries in its metadata."""
    import importlib.metadata as md

    seen = set()
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (dist.metadata["Name"] or "").lower()
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name not in seen and len(text) >= min_chars:
            seen.add(name)
            yield f"package:{name}", text


def write_demo_corpus(out: str | Path, max_bytes: int | None = None, shards: int = 2) -> list[Path]:
    """Write the corpus as `shards` jsonl files ({"id", "text"}); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"python_docs_{i:02d}.jsonl" for i in range(shards)]
    files = [p.open("w", encoding="utf-8") for p in paths]
    written = 0
    try:
        for i, (doc_id, text) in enumerate(_all_docs()):
            line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
            files[i % shards].write(line)
            written += len(line)
            if max_bytes and written >= max_bytes:
                break
    finally:
        for f in files:
            f.close()
    return paths


def write_demo_chats(out: str | Path, limit: int | None = None) -> Path:
    """Supervised fine-tuning data for the demo (`kiln sft`): per standard-library module with a docstring, the
    question "What is the NAME module for?" answered by the first line of its docstring, as {"prompt",
    "completion"} records in one jsonl file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for doc_id, text in stdlib_docstrings(min_chars=40):
            if not doc_id.startswith("module:") or (limit is not None and n >= limit):
                continue
            answer = text.strip().splitlines()[0].strip()
            if 10 <= len(answer) <= 160:
                f.write(json.dumps({"prompt": f"What is the {doc_id[7:]} module for?", "completion": answer}) + "\n")
                n += 1
    return out


def _all_docs() -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for doc_id, text in (*pydoc_topics(), *stdlib_docstrings(), *package_descriptions()):
        if doc_id not in seen:
            seen.add(doc_id)
            yield doc_id, text
