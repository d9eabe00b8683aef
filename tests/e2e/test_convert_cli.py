"""convert_ckpt.py as users run it (MindSpeed-LLM flags), checked by exit code, output files and messages."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.convert_fixtures import hf_tensors, tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "convert_ckpt.py")


def cli(*args, prelude: str | None = None):
    # a world of one of its own: not the torch.distributed settings an in-process test left in os.environ
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, MINDSPEED_LORA_DEVICE="cpu", PYTHONWARNINGS="ignore")
    if prelude is None:
        cmd = [sys.executable, SCRIPT, *args]
    else:  # run the script after `prelude` (a deliberately broken transform) in the same interpreter
        cmd = [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = {[SCRIPT, *args]!r}\n"
               f"runpy.run_path({SCRIPT!r}, run_name='__main__')"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "hf")
    tiny_hf("qwen3", path, seed=2, lively=True)
    return path


def test_hf_to_mg_with_precision_then_back_into_mg2hf(hf_dir, tmp_path):
    mg = str(tmp_path / "mg")
    p = cli("--use-mcore-models", "--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
            "--load-dir", hf_dir, "--save-dir", mg, "--target-tensor-parallel-size", "2",
            "--target-pipeline-parallel-size", "2", "--num-layer-list", "3,1", "--model-type-hf", "qwen3",
            "--test-convert-precision")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "precision test: logits vs HF over 64 tokens" in p.stdout and "argmax mismatches 0" in p.stdout
    assert "hf -> mg" in p.stderr  # the progress bar
    assert os.path.isfile(os.path.join(mg, "iter_0000001", "mp_rank_01_001", "model_optim_rng.pt"))
    # MindSpeed-LLM's mg -> hf gives the original HF dir as --save-dir and finds the result in its mg2hf/
    orig = str(tmp_path / "orig")
    shutil.copytree(hf_dir, orig)
    p = cli("--use-mcore-models", "--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "hf",
            "--load-dir", mg, "--save-dir", orig, "--target-tensor-parallel-size", "1",
            "--target-pipeline-parallel-size", "1", "--load-checkpoint-loosely")
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = hf_tensors(os.path.join(orig, "mg2hf")), hf_tensors(hf_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_bad_input_exits_2_with_a_message(hf_dir, tmp_path):
    p = cli("--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--target-tensor-parallel-size", "3")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: --target-tensor-parallel-size=3 does not divide")
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o")
    p = cli("--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--lora-load", hf_dir)
    assert p.returncode == 2 and "--lora-load is read by mg -> hf" in p.stderr
    p = cli("--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--no-such-flag")
    assert p.returncode == 2 and "unrecognized arguments: --no-such-flag" in p.stderr


def test_precision_failure_exits_1_and_publishes_nothing(hf_dir, tmp_path):
    broken = ("import mindspeed_lora.checkpoint.sharding as s\n"
              "good = s.interleave_qkv\n"
              "s.interleave_qkv = lambda q, k, v, groups: good(q, v, k, groups)")
    p = cli("--load-dir", hf_dir, "--save-dir", str(tmp_path / "bad"), "--target-tensor-parallel-size", "2",
            "--test-convert-precision", prelude=broken)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "precision test FAILED: mean |logit diff|" in p.stderr
    assert os.listdir(tmp_path) == []
