"""Small timing helpers shared by the benchmark scripts (not a test)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Mapping


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


def interleaved_times(variants: Mapping[str, Callable[[], object]], rounds: int = 5, reps: int = 3, warmup: int = 1,
                      budget_s: float = 60.0) -> dict[str, list[float]]:
    """Every timed call's wall time in ms, per variant, measured as `interleaved_ms` does."""
    if not variants:
        return {}
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    start = time.perf_counter()
    for done in range(max(rounds, 2)):
        if done >= 2 and time.perf_counter() - start > budget_s:
            break
        for name, fn in variants.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(variants: Mapping[str, Callable[[], object]], rounds: int = 5, reps: int = 3, warmup: int = 1,
                   budget_s: float = 60.0) -> dict[str, float]:
    """Median wall time in ms of each variant, the variants timed in turn.

    Takes variants, a name -> zero-argument callable mapping (what the callables return is ignored).
    Every variant is first called `warmup` times; then each round runs every variant in turn, in
    the mapping's order (A A A B B B C C C, then again: A B C A B C ... over rounds), timing each
    of its `reps` calls on its own. Rounds stop at `rounds`, or earlier once `budget_s` seconds
    have passed since the first round began (never fewer than 2 rounds). Returns name -> median
    ms over all of that variant's timed calls, in the same order.

    Why interleave: on a shared or noisy machine (other jobs, frequency changes, a warming cache)
    the conditions drift over time. Timing one variant to the end before the next would give the
    drift to whichever variant ran during it; taking turns spreads it over all variants alike,
    so their ratios stay meaningful even when the absolute numbers are not.
    """
    return {name: statistics.median(ts) for name, ts in
            interleaved_times(variants, rounds, reps, warmup, budget_s).items()}


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


START_LOAD = os.getloadavg()[0]      # taken when a benchmark imports this module, before it starts work


def load_note() -> str:
    """A sentence on how busy the machine was when the benchmark started (the 1-minute load average
    at import, against the core count), printed in results files instead of a claim."""
    cores = os.cpu_count() or 1
    busy = "other work was running" if START_LOAD > 0.5 * cores else "the machine was otherwise idle"
    return (f"1-minute load average when the run started: {START_LOAD:.1f} on {cores} cores ({busy}). The variants "
            "were interleaved round by round, so drift during the run hits them alike and the ratios stay meaningful.")
