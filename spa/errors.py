"""The one exception type users see: a clear, one-line reason."""


class SpaError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits 2."""


class CalibrationRunError(SpaError):
    """onnxruntime could not run the model on its calibration inputs (generated at sizes the model
    does not take, or a file that does not fit it)."""


class SpaWarning(UserWarning):
    """Something the user must know that does not stop the work (a fallback, an approximation);
    the CLI prints it as `spa: warning: ...`."""
