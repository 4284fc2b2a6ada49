"""Small timing helpers shared by the benchmark scripts (not a test)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 7, budget_s: float = 20.0,
              min_reps: int = 3) -> float:
    """Median wall time of fn() in ms after `warmup` calls; stops early once `budget_s` is spent
    (but never before `min_reps` timed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > budget_s and len(times) >= min_reps:
            break
    return statistics.median(times) * 1e3


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of rows (dicts) over cols."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
