"""posttrain_gpt.py training: single-rank references (one launch of 1 rank), then every 2-rank check (one
launch of 2 gloo ranks) compared against them."""
import pytest

from tests.distributed import checks_training, checks_training_single
from tests.distributed.harness import assert_check, check_names, launch

SINGLE = check_names(checks_training_single)
PAIR = check_names(checks_training)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def single(root):
    return launch("tests.distributed.checks_training_single", SINGLE, str(root / "single"), nproc=1)


@pytest.fixture(scope="module")
def pair(root, single):
    return launch("tests.distributed.checks_training", PAIR, str(root / "pair"), nproc=2)


@pytest.mark.parametrize("name", SINGLE)
def test_training_single_rank(single, name):
    assert_check(single, name)


@pytest.mark.parametrize("name", PAIR)
def test_training_two_ranks(pair, name):
    assert_check(pair, name)
