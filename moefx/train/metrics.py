"""Training metrics: one CSV row per optimizer step, and a loss-curve SVG.

CSV columns `step,loss,aux,grad_norm,lr,tokens_per_s,eval_loss` (`eval_loss` filled at the steps
that validated; + `kd` for distillation), floats as
`repr(float)` so a value read back is the value logged. A resumed run keeps the rows up to its
checkpoint's step (rewritten atomically) and appends after them, so the file of an interrupted and
resumed run equals an uninterrupted one's, timings aside.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..fileio import write_atomic

__all__ = ["MetricsCSV", "loss_svg", "COLUMNS"]

COLUMNS = ("step", "loss", "aux", "grad_norm", "lr", "tokens_per_s", "eval_loss")


def _cell(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class MetricsCSV:
    """Append rows to `path` (see the module docstring); `start`: the step a resumed run continues from."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...] = COLUMNS, start: int = 0):
        self.path, self.columns = Path(path), tuple(columns)
        kept = []
        if start > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for row in kept:
            w.writerow([row.get(c, "") for c in self.columns])
        write_atomic(self.path, buf.getvalue())       # makes the parent folder

    def write(self, row: dict) -> None:
        """Append one row (missing columns empty) and flush it to disk."""
        with open(self.path, "a", newline="") as f:
            f.write(",".join(_cell(row.get(c, "")) for c in self.columns) + "\n")


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics CSV, numbers as floats (step as int)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def loss_svg(rows: list[dict], path: str | os.PathLike, *, evals: list[tuple[int, float]] = (),
             title: str = "training loss", width: int = 720, height: int = 400) -> None:
    """Write the training loss per step (and validation points `evals` [(step, loss)]) as an SVG."""
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not pts:
        return
    xs = [s for s, _ in pts] + [s for s, _ in evals]
    ys = [v for _, v in pts] + [v for _, v in evals]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
    pad = 56

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        x = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{sx(x):.1f}" y="{height - pad + 18}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">optimizer step</text>')
    out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>')
    for s, v in evals:
        out.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="4" fill="#d62728"/>')
    out.append(f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end" fill="#1f77b4">train loss</text>')
    if evals:
        out.append(f'<text x="{width - pad}" y="{pad + 8}" text-anchor="end" fill="#d62728">validation loss</text>')
    out.append("</svg>")
    write_atomic(path, "\n".join(out) + "\n")
