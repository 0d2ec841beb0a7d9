"""Logging and progress shared by every stage: rich on a terminal, plain lines in CI logs."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.credentials import redact


class _Redacted(logging.Filter):
    """Log lines never show credentials (MLflow and requests quote the URLs they called)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


class _MissingKernels(logging.Filter):
    """torchao's "Failed to load .../_C_*.so" at import: optional CUDA kernels a CPU install (or another Python)
    lacks, not actionable. Only that message is dropped (shown with -v); torchao's other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Failed to load ") and ".so" in text.split(":", 1)[0]) \
            or logging.getLogger("kiln").isEnabledFor(logging.DEBUG)


# Human-facing output goes to stderr so that stdout stays clean for `--json`.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
log = logging.getLogger("kiln")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    rank = os.environ.get("RANK")
    fmt = f"[rank {rank}] %(message)s" if rank not in (None, "0") else "%(message)s"
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_Redacted())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)
    # optional CUDA/triton kernels that a CPU install lacks: not actionable, only noise
    for noisy in ("torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torchao = logging.getLogger("torchao")
    torchao.filters[:] = [f for f in torchao.filters if not isinstance(f, _MissingKernels)] + [_MissingKernels()]


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "it", disable: bool | None = None):
    """`with progress("tokenize", total=n) as advance: advance(k)` — a bar on rank 0 only."""
    if disable is None:
        disable = not is_main_process()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: float = 1, **fields) -> None:
            bar.update(task, advance=n, **fields)
            elapsed = bar.tasks[task].elapsed or 0.0
            if elapsed > 0:
                done = bar.tasks[task].completed
                bar.update(task, rate=f"{done / elapsed:,.0f} {unit}/s")

        yield advance


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """A summary table on stderr (stdout is reserved for --json)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.3e}"
    return str(value)


def kv_table(title: str, items: dict) -> None:
    print_table(title, [{"key": k, "value": v} for k, v in items.items()], ["key", "value"])


__all__ = ["console", "log", "setup_logging", "progress", "print_table", "kv_table", "is_main_process"]
