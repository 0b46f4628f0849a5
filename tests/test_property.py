"""Random CNN graphs built from the supported rules: always valid and exactly equivalent."""
from hypothesis import HealthCheck, given, settings

from oracle import check_exact
from random_graphs import cnn_models
from spa.selection import Target
from spa.errors import SpaError


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cnn_models())
def test_random_cnn_prunes_validly_and_exactly(model):
    try:
        check_exact(model, Target(ratio=0.5), expect_removed=False)
    except SpaError as exc:
        assert "nothing prunable" in str(exc) or "removes no channel" in str(exc)
