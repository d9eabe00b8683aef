"""posttrain_gpt.py --stage dpo on 2 gloo ranks: every check of checks_dpo.py in one torchrun launch."""
import pytest

from tests.distributed import checks_dpo
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_dpo)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_dpo", NAMES, str(tmp_path_factory.mktemp("dpo")))


@pytest.mark.parametrize("name", NAMES)
def test_dpo_two_ranks(results, name):
    assert_check(results, name)
