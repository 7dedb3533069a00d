"""Reporting: the stdout table, the targets, the JSON results file and the PNG plots.

matplotlib is the ``bench`` extra; it is imported only when a plot is drawn, and a
missing matplotlib skips the plot with a message instead of failing the run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["Target", "plot_cdf", "plot_throughput", "print_table", "print_targets", "write_json"]


@dataclass
class Target:
    """A figure next to the bar it should meet."""

    name: str
    value: float
    bar: float
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether the figure meets the bar."""
        return self.value >= self.bar if self.higher_is_better else self.value <= self.bar

    def to_json(self) -> dict[str, Any]:
        """The target as it goes into the JSON results."""
        return {"name": self.name, "value": self.value, "bar": self.bar, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "ok": self.ok}

    def line(self) -> str:
        """One report line."""
        op = ">=" if self.higher_is_better else "<="
        mark = "met   " if self.ok else "MISSED"
        return f"  [{mark}] {self.name}: {self.value:,.4g}{self.unit} (target {op} {self.bar:,.4g}{self.unit}){'  ' + self.note if self.note else ''}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file: Any = None) -> None:
    """A plain aligned text table."""
    out = file or sys.stdout
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}", file=out)
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True))), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))), file=out)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def print_targets(targets: Sequence[Target], file: Any = None) -> None:
    """The targets block."""
    if not targets:
        return
    out = file or sys.stdout
    print("\ntargets", file=out)
    for t in targets:
        print(t.line(), file=out)


def write_json(path: str, data: Any) -> None:
    """The results file (pretty enough to diff)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(data), indent=1))


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'collector[bench]')", file=sys.stderr)
        return None
    return plt


def plot_throughput(path: str, title: str, series: dict[str, list[tuple[int, float]]], flat: dict[str, float]) -> bool:
    """Events/s against workers (or processes): one line per series, flat peers dashed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for name, pts in series.items():
        pts = sorted(pts)
        style = "o-" if name.startswith("collector") else "s--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    for name, y in flat.items():
        ax.axhline(y, linestyle=":", linewidth=1.2, color="gray")
        ax.annotate(name, (1, y), textcoords="offset points", xytext=(2, 3), fontsize=7, color="dimgray")
    xs = sorted({p[0] for pts in series.values() for p in pts}) or [1]
    ax.set_xticks(xs)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("events/s (median)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_cdf(path: str, title: str, series: dict[str, list[float]], xlabel: str, marks: dict[str, float] | None = None) -> bool:
    """Empirical CDFs (one line per series), with vertical marks (lower bounds)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for name, xs in series.items():
        xs = sorted(xs)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{name} (n={len(xs)})")
    for name, x in (marks or {}).items():
        ax.axvline(x, linestyle=":", color="gray")
        ax.annotate(name, (x, 0.02), textcoords="offset points", xytext=(3, 0), fontsize=7, rotation=90, color="dimgray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction ≤ x")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
