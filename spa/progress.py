"""Progress bars (tqdm) for the loops that can take more than a few seconds.

Library calls show them only on a terminal; the CLI shows them always (off with --quiet) through
`showing(True | False)`. Off a terminal (a log, CI) a bar that runs over LOG_INTERVAL seconds writes
one line every LOG_INTERVAL seconds instead of redrawing one line with carriage returns.
"""
from __future__ import annotations

import contextlib
import re
import sys

_show: bool | None = None  # None: only when stderr is a terminal
LOG_INTERVAL = 10.0  # seconds between a bar's lines in a log (the longest silence we allow)


def show(enabled: bool | None) -> None:
    global _show
    _show = enabled


@contextlib.contextmanager
def showing(enabled: bool | None):
    """Bars on (True), off (False) or on a terminal only (None) inside the block, as before after it."""
    previous = _show
    show(enabled)
    try:
        yield
    finally:
        show(previous)


def bar(iterable=None, desc: str = "", total: int | None = None, **kwargs):
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    where = dict(file=sys.stderr, mininterval=0.5, dynamic_ncols=True) if terminal else \
        dict(file=_Lines(sys.stderr), mininterval=LOG_INTERVAL, delay=LOG_INTERVAL, ascii=True)
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not (terminal if _show is None else _show),
                **where, **kwargs)


_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """tqdm's redraws as whole lines: a terminal overwrites the line after a carriage return, a
    log file would keep every redraw on one ever longer line. Cursor moves (nested bars) and
    blank redraws (a bar clearing itself) are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        for part in _CURSOR_MOVES.sub("", text).split("\r"):
            if part.strip():
                self.stream.write(part.rstrip("\n") + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
