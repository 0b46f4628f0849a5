"""The architecture-only models shipped with the onnx package: prune, stay valid, pass the oracle."""
import pytest

from light_models import SLOW_LIGHT_MODELS, light_model_paths, materialize
from oracle import check_exact
from spa.selection import Target

PATHS = light_model_paths(include_slow=True)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_light_model_prunes_exactly(path):
    model = materialize(path, seed=0, check=False, calibrate=path.stem not in SLOW_LIGHT_MODELS)
    check_exact(model, Target(ratio=0.3), batch=1)
