"""Fused ops on 2 gloo ranks (vocab-parallel fused cross-entropy, TP=2 model with the fused-ops spec hook),
all in one torchrun launch."""
import pytest

from tests.distributed import checks_ops
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_ops)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_ops", NAMES, str(tmp_path_factory.mktemp("ops")))


@pytest.mark.parametrize("name", NAMES)
def test_ops(results, name):
    assert_check(results, name)
