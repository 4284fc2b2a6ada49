"""A progress bar for training loops (tqdm when installed, a log line every `log_every` steps otherwise)."""
from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """Steps done of `total`, with the latest values of `fields` (keys of the rows given to update)."""

    def __init__(self, enabled: bool, total: int, initial: int, *, desc: str = "distill",
                 fields: tuple[str, ...] = ("lm", "kd", "aux"), fmt: str = ".4f"):
        self._bar = None
        self._enabled = enabled
        self._total = total
        self._desc, self._fields, self._fmt = desc, fields, fmt
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr,
                         dynamic_ncols=True, leave=True)

    def _text(self, row: dict) -> dict[str, str]:
        return {k: (format(row[k], self._fmt) if isinstance(row[k], float) else str(row[k])) for k in self._fields
                if k in row}

    def update(self, row: dict, show: bool) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if show:
                self._bar.set_postfix(self._text(row), refresh=False)
        elif show:
            values = " ".join(f"{k}={v}" for k, v in self._text(row).items())
            print(f"{self._desc} step {int(row['step']) + 1}/{self._total} {values}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
