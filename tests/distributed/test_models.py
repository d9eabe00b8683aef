"""Model parity on 2 gloo ranks (TP=2 with and without SP, PP=2, gradients), all in one torchrun launch."""
import pytest

from tests.distributed import checks_models
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_models)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_models", NAMES, str(tmp_path_factory.mktemp("models")))


@pytest.mark.parametrize("name", NAMES)
def test_models(results, name):
    assert_check(results, name)
