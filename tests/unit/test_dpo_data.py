"""DPO plumbing: pairwise files -> micro-batches of whole pairs, the --dpo-* flags, and switching adapters off
(oracle: the same model built without LoRA)."""
import numpy as np
import pytest
import torch

from mindspeed_lora.errors import UserError
from tests import dpo_fixtures as dfx
from tests import training_fixtures as fx


def test_pairs_become_chosen_then_rejected_rows(tmp_path):
    from mindspeed_lora.data.pairwise_dataset import PairwiseIndexedDataset, collate_pairs
    from mindspeed_lora.data.sft_dataset import CollateOptions

    pairs = dfx.preference_pairs(3, seed=2)
    ds = PairwiseIndexedDataset(dfx.write_pairwise_data(str(tmp_path / "p"), pairs))
    assert len(ds) == 3 and ds.lengths.tolist() == [len(p["chosen_input_ids"]) for p in pairs]
    batch = collate_pairs([ds[0], ds[2]], CollateOptions(seq_length=16))
    assert batch["pairs"] == 2 and batch["tokens"].shape == (4, 16)
    for row, (i, side) in enumerate([(0, "chosen"), (2, "chosen"), (0, "rejected"), (2, "rejected")]):
        ids, labels = pairs[i][f"{side}_input_ids"], pairs[i][f"{side}_labels"]
        n = len(ids)
        assert batch["tokens"][row, :n].tolist() == ids.tolist()
        # shifted: position t predicts token t+1; only response tokens are targets
        targets = [t for t in range(n - 1) if labels[t + 1] != -100]
        assert torch.nonzero(batch["loss_mask"][row]).flatten().tolist() == targets
        assert batch["labels"][row, targets].tolist() == [int(ids[t + 1]) for t in targets]
    with pytest.raises(UserError, match="pair 0 has a sequence of"):
        ds.check_fits(4)


def test_sft_data_and_mismatched_files_refused(tmp_path):
    from mindspeed_lora.data.pairwise_dataset import PairwiseIndexedDataset, check_pairwise_prefix
    from mindspeed_lora.data.sft_dataset import file_prefix

    sft = fx.write_sft_data(str(tmp_path / "sft"), fx.toy_samples(2))
    with pytest.raises(UserError, match="found SFT data"):
        check_pairwise_prefix(sft)
    prefix = dfx.write_pairwise_data(str(tmp_path / "p"), dfx.preference_pairs(3))
    short = dfx.write_pairwise_data(str(tmp_path / "q"), dfx.preference_pairs(2))
    for ext in (".bin", ".idx"):
        src = file_prefix(short, "rejected_labels") + ext
        open(file_prefix(prefix, "rejected_labels") + ext, "wb").write(open(src, "rb").read())
    with pytest.raises(UserError, match="rejected_labels_document: does not line up"):
        PairwiseIndexedDataset(prefix)


def test_dpo_flags_reach_the_config_and_bad_values_are_refused():
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.arguments.dpo import dpo_config_from_args
    from mindspeed_lora.dpo.loss import DPOConfig

    base = dfx.dpo_argv("m", "d")
    args = parse_args("posttrain_gpt", [*base, "--dpo-beta", "0.3", "--dpo-loss-type", "sigmoid",
                                        "--dpo-label-smoothing", "0.1", "--pref-ftx", "0.5"])
    assert dpo_config_from_args(args) == DPOConfig(beta=0.3, loss_type="sigmoid", label_smoothing=0.1, pref_ftx=0.5)
    assert dpo_config_from_args(parse_args("posttrain_gpt", base)) == DPOConfig()
    with pytest.raises(UserError, match="--dpo-label-smoothing applies to --dpo-loss-type sigmoid"):
        dpo_config_from_args(parse_args("posttrain_gpt", [*base, "--dpo-loss-type", "ipo",
                                                          "--dpo-label-smoothing", "0.1"]))
    with pytest.raises(SystemExit):
        parse_args("posttrain_gpt", [*base, "--dpo-loss-type", "kto"])


def test_run_config_keeps_the_stage_and_refuses_per_token_loss(tmp_path):
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.dpo.trainer import DPOTrainer, config_from_args

    cfg = config_from_args(parse_args("posttrain_gpt", dfx.dpo_argv("m", "d", extra=["--calculate-per-token-loss"])))
    assert cfg.training.args["stage"] == "dpo"
    with pytest.raises(UserError, match="--calculate-per-token-loss"):
        DPOTrainer(cfg.training, cfg.dpo).setup()


def test_mindspeed_llm_simpo_stage_maps_to_the_simpo_loss():
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.dpo.loss import DPOConfig
    from mindspeed_lora.dpo.trainer import config_from_args

    def dpo_of(extra):
        argv = [x if x != "dpo" else "simpo" for x in dfx.dpo_argv("m", "d", extra=extra)]
        return config_from_args(parse_args("posttrain_gpt", argv)).dpo

    assert dpo_of(["--simpo-beta", "2.0", "--gamma-beta-ratio", "0.5"]) == \
        DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=1.0)
    assert dpo_of([]) == DPOConfig(beta=2.5, loss_type="simpo", simpo_gamma=2.5 * 1.4)
    with pytest.raises(UserError, match="--simpo-loss-type hinge: only sigmoid"):
        dpo_of(["--simpo-loss-type", "hinge"])
    with pytest.raises(UserError, match="--stage simpo with --dpo-loss-type ipo"):
        dpo_of(["--dpo-loss-type", "ipo"])


def test_ref_load_flag_and_its_mindspeed_name():
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.dpo.trainer import config_from_args

    for flag in ("--ref-load", "--ref-model"):
        cfg = config_from_args(parse_args("posttrain_gpt", dfx.dpo_argv("m", "d", extra=[flag, "/ref"])))
        assert cfg.ref_load == "/ref"
    assert config_from_args(parse_args("posttrain_gpt", dfx.dpo_argv("m", "d"))).ref_load is None


def test_refer_model_iter_reaches_the_config_and_is_refused_where_it_cannot_apply(tmp_path):
    """--refer-model-iter N (MindSpeed-LLM's flag; no default here) is refused before anything is built: with
    LoRA (the reference is the base with its adapters off), with a reference-free loss, for an HF reference dir,
    and for an iteration the reference dir does not hold (the saved ones listed; on a checkpoint that records its
    reference, that one named)."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.checkpoint import megatron_io
    from mindspeed_lora.dpo.trainer import DPOTrainer, config_from_args

    def cfg(load, extra):
        return config_from_args(parse_args("posttrain_gpt", dfx.dpo_argv(str(load), "d", extra=extra)))

    def setup(load, extra):
        DPOTrainer.of(cfg(load, extra)).setup()

    assert cfg("m", ["--refer-model-iter", "1"]).refer_model_iter == 1
    assert cfg("m", []).refer_model_iter is None
    with pytest.raises(UserError, match="--refer-model-iter -1: expected an iteration number"):
        cfg("m", ["--refer-model-iter", "-1"])
    hf, ck = tmp_path / "hf", tmp_path / "ck"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for it in (1, 2):
        (ck / megatron_io.iteration_dir_name(it)).mkdir(parents=True)
    (ck / megatron_io.LATEST).write_text("2")
    megatron_io.write_metadata(str(ck), {})
    with pytest.raises(UserError, match="^--refer-model-iter 1: with LoRA the reference is the --load model with its "
                                        "adapters off; --refer-model-iter is for full-parameter DPO$"):
        setup(ck, ["--refer-model-iter", "1", "--lora-target-modules", "all-linear"])
    with pytest.raises(UserError, match="^--refer-model-iter 1: --dpo-loss-type simpo uses no reference model$"):
        setup(ck, ["--refer-model-iter", "1", "--dpo-loss-type", "simpo"])
    with pytest.raises(UserError, match="^--refer-model-iter 1: --load .*/hf is an HF model directory"):
        setup(hf, ["--refer-model-iter", "1"])
    with pytest.raises(UserError, match="^--refer-model-iter 1: --ref-load .*/hf is an HF model directory"):
        setup(ck, ["--ref-load", str(hf), "--refer-model-iter", "1"])
    with pytest.raises(UserError, match=r"^--refer-model-iter 3: --load .*/ck: no iteration 3 \(no iter_0000003; "
                                        r"saved iterations: 1, 2\)$"):
        setup(ck, ["--refer-model-iter", "3"])
    megatron_io.write_metadata(str(ck), {"dpo_reference": "/converted", "dpo_reference_iteration": 1})
    with pytest.raises(UserError, match=r"saved iterations: 1, 2\); without --refer-model-iter a resume compares "
                                        r"against the reference the checkpoint recorded \(/converted, iteration 1\)$"):
        setup(ck, ["--refer-model-iter", "3"])


def test_adapters_disabled_gives_the_base_model(tmp_path):
    from mindspeed_lora import tiny
    from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
    from mindspeed_lora.checkpoint.weight_map import load_hf_weights
    from mindspeed_lora.lora import LoraConfig, adapters_disabled, lora_spec_hook, prepare_lora_model
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
    from mindspeed_lora.models.family import read_hf_config
    from mindspeed_lora.parallel import initialize

    initialize(1, 1, seed=5)
    hf = str(tmp_path / "hf")
    tiny.build_hf_model("qwen3", hf, seed=3)
    arch, par = ModelArch.from_hf_config(read_hf_config(hf)), ParallelOptions()

    def build(hooks):
        model = build_gpt_model(arch, par, ModelOptions(spec_hooks=hooks), pre_process=True, post_process=True)
        load_hf_weights(model, HFCheckpointReader(hf), arch, par, 0, 0)
        return model

    lora = build([lora_spec_hook(LoraConfig(r=4, alpha=8, target_modules=["linear_qkv", "linear_proj",
                                                                             "linear_fc1", "linear_fc2"]))])
    prepare_lora_model(lora, seed=1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base = build([])
    ids = torch.as_tensor(np.arange(10, 26).reshape(2, 8))
    pos = torch.arange(8).expand(2, -1)
    with torch.no_grad():
        want, adapted = base(ids, pos, None), lora(ids, pos, None)
        assert (adapted - want).abs().max() > 1e-2
        with adapters_disabled(lora) as n:
            assert n == 4 * arch.num_layers
            off = lora(ids, pos, None)
        assert torch.equal(lora(ids, pos, None), adapted)  # switched back on
    assert (off - want).abs().max().item() < 1e-6
