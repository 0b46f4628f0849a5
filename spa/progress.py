"""Progress bars (tqdm) for the loops that can take more than a few seconds.

Library calls show them only on a terminal; the CLI shows them always (off with --quiet) through
`showing(True | False)`. Off a terminal (a log, CI) a bar that runs over LOG_INTERVAL seconds writes
one line every LOG_INTERVAL seconds instead of redrawing one line with carriage returns.
A bar also redraws while its loop is blocked in one long step (an onnxruntime run of a 1.1B model,
one big factorisation): its elapsed time keeps moving, so no stage goes silent (`_Heartbeat`).
"""
from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import weakref

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
    shown = tqdm(iterable, desc=desc, total=total, leave=False, disable=not (terminal if _show is None else _show),
                 **where, **kwargs)
    if not shown.disable:
        _Heartbeat.watch(shown)
    return shown


class _Heartbeat:
    """One daemon thread that redraws every open bar not drawn for STALLED x its `mininterval` (0.5
    s on a terminal, LOG_INTERVAL in a log) once its `delay` has passed: tqdm draws only when the
    loop moves, and its own monitor thread only redraws bars that skip iterations (miniters > 1).
    tqdm's own `last_print_t` is left alone: its iterator counts the steps since its last draw from
    it, and moving it made a bar count the same steps again (MiniLM's 4000-step recovery showed
    "7318it" after 1300 steps)."""
    bars: "weakref.WeakSet" = weakref.WeakSet()
    thread: threading.Thread | None = None
    lock = threading.Lock()
    TICK = 0.25  # seconds between checks
    STALLED = 1.5  # mininterval x this without a draw: the loop is stuck in one step (a moving loop draws itself)

    @classmethod
    def watch(cls, shown) -> None:
        with cls.lock:
            cls.bars.add(shown)
            if cls.thread is None or not cls.thread.is_alive():
                cls.thread = threading.Thread(target=cls._run, name="spa-progress", daemon=True)
                cls.thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(cls.TICK)
            with cls.lock:
                bars = list(cls.bars)
            for shown in bars:
                with shown.get_lock():  # tqdm's write lock: a bar closing meanwhile is cleared after this draw
                    now = time.time()
                    drawn = max(shown.last_print_t, getattr(shown, "heartbeat_t", 0.0))
                    if shown.disable or now < shown.start_t + shown.delay or \
                            now - drawn < shown.mininterval * cls.STALLED:
                        continue
                    shown.refresh(nolock=True)
                    shown.heartbeat_t = now


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
