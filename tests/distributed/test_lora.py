"""LoRA under TP (with and without SP) and PP with full recompute on 2 gloo ranks, in one torchrun launch."""
import pytest

from tests.distributed import checks_lora
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_lora)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_lora", NAMES, str(tmp_path_factory.mktemp("lora")))


@pytest.mark.parametrize("name", NAMES)
def test_lora(results, name):
    assert_check(results, name)
