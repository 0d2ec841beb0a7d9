"""`kiln plot RUN_DIR`: loss / val_loss and tokens/s curves from metrics.jsonl, as a PNG (matplotlib Agg); and
`plot_lines`, named curves on one axis (the benchmarks' comparisons)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import KilnError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir)
    path = path if path.is_file() else path / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise KilnError(f"{path}: not found; is {path.parent} a `kiln train` output directory?") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise KilnError(f"{path}:{n}: not valid JSON") from None
    if not rows:
        raise KilnError(f"{path}: no metrics logged yet")
    return rows


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(lines: dict[str, tuple[list[float], list[float]]], out: str | Path, xlabel: str, ylabel: str,
               title: str, levels: dict[str, float] | None = None) -> Path:
    """One PNG: each named (xs, ys) curve with markers, each named level a dashed horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, "o-", markersize=3, label=name)
    for name, y in (levels or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    plt = _pyplot()
    rows = read_metrics(run_dir)
    base = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    out = Path(out) if out else base / "curves.png"
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax_loss.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_tps.plot(steps, [r.get("tokens_per_s", 0) for r in rows], color="tab:green")
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(str(base))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"out": str(out), "points": len(rows), "val_points": len(val), "last_step": steps[-1],
            "last_loss": rows[-1]["loss"]}
