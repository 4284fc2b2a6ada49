"""A progress bar for training loops (tqdm when installed, a log line every `log_every` steps otherwise)."""
from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    def __init__(self, enabled: bool, total: int, initial: int):
        self._bar = None
        self._enabled = enabled
        self._total = total
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc="distill", file=sys.stderr,
                         dynamic_ncols=True, leave=True)

    def update(self, row: dict[str, float], show: bool) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if show:
                self._bar.set_postfix(lm=f"{row['lm']:.4f}", kd=f"{row['kd']:.4f}",
                                      aux=f"{row['aux']:.4f}", refresh=False)
        elif show:
            print(f"distill step {int(row['step']) + 1}/{self._total} lm={row['lm']:.4f} "
                  f"kd={row['kd']:.4f} aux={row['aux']:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

