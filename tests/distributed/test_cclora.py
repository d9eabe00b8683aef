"""CCLoRA's five cases vs the unfused LoRA layers, its NPU path under the fake torch_npu, and a tiny model with
--lora-fusion, on 2 gloo ranks in one torchrun launch."""
import pytest

from tests.distributed import checks_cclora
from tests.distributed.harness import assert_check, check_names, launch

NAMES = check_names(checks_cclora)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.distributed.checks_cclora", NAMES, str(tmp_path_factory.mktemp("cclora")))


@pytest.mark.parametrize("name", NAMES)
def test_cclora(results, name):
    assert_check(results, name)
