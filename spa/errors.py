"""The one exception type users see: a clear, one-line reason."""
from __future__ import annotations


class SpaError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits 2."""


def first_line(exc: BaseException, width: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `width`
    characters: what a one-line SpaError quotes of the error behind it."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if width is None or len(line) <= width else line[:width - 3] + "..."


class CalibrationRunError(SpaError):
    """onnxruntime could not run the model on its calibration inputs (generated at sizes the model
    does not take, or a file that does not fit it)."""


class SpaWarning(UserWarning):
    """Something the user must know that does not stop the work (a fallback, an approximation);
    the CLI prints it as `spa: warning: ...`."""
