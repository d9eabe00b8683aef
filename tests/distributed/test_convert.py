"""Converted checkpoints loaded per rank at TP=2 and PP=2 (uneven), all in one 2-rank torchrun launch."""
import pytest

from tests.distributed import checks_convert
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_convert)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_convert", NAMES, str(tmp_path_factory.mktemp("convert")))


@pytest.mark.parametrize("name", NAMES)
def test_convert(results, name):
    assert_check(results, name)
