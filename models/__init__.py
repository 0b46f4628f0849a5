"""Model zoo: small models built in code for tests, benchmarks and the demo."""


def wheel_file(*parts: str) -> str:
    """A model file that benchmarks/wheel_models.py unpacked from a package's wheel: under $SPA_WHEEL_MODELS, or
    <tmp>/spa_wheel_models (wheel_models.default_dir's rule; that script runs without models/ on its path).
    FileNotFoundError naming `make survey-wheels` where it is not there."""
    import os
    import tempfile

    root = os.environ.get("SPA_WHEEL_MODELS") or os.path.join(tempfile.gettempdir(), "spa_wheel_models")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (make survey-wheels unpacks it)")
    return path
