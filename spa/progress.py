"""Progress bars (tqdm) for the loops that can take more than a few seconds.

Library calls show them only on a terminal; the CLI turns them on (off with --quiet) through
`show(True | False)`.
"""
from __future__ import annotations

import sys

_show: bool | None = None  # None: only when stderr is a terminal (tqdm's own test)


def show(enabled: bool | None) -> None:
    global _show
    _show = enabled


def bar(iterable=None, desc: str = "", total: int | None = None, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, mininterval=0.5,
                disable=None if _show is None else not _show, dynamic_ncols=True, **kwargs)
