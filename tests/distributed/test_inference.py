"""Generation and evaluation on 2 gloo ranks (TP=2 vs TP=1, DP-split evaluation), all in one torchrun launch."""
import pytest

from tests.distributed import checks_inference
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_inference)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_inference", NAMES, str(tmp_path_factory.mktemp("inference")))


@pytest.mark.parametrize("name", NAMES)
def test_inference(results, name):
    assert_check(results, name)
