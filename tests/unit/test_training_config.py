"""posttrain_gpt.py flags -> typed config: MindSpeed-LLM scripts parse, bad combinations are refused."""
import json
import shlex

import pytest
import torch

from mindspeed_lora.arguments import parse_args
from mindspeed_lora.errors import UserError
from mindspeed_lora.training.config import training_config_from_args
from mindspeed_lora.training.model import check_layout, inspect_load_dir, resolve_arch

# the flag set of a MindSpeed-LLM Qwen3 full fine-tuning script (examples/mcore/qwen3/tune_*_full.sh)
MINDSPEED_SCRIPT = """
    --use-mcore-models --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec --kv-channels 128 --qk-layernorm
    --num-layers 28 --hidden-size 1024 --use-rotary-position-embeddings --num-attention-heads 16
    --ffn-hidden-size 3072 --max-position-embeddings 32768 --seq-length 8192 --train-iters 2000
    --micro-batch-size 1 --global-batch-size 16 --make-vocab-size-divisible-by 1 --padded-vocab-size 151936
    --rotary-base 1000000 --disable-bias-linear --swiglu --tokenizer-type PretrainedFromHF
    --tokenizer-name-or-path /tok --normalization RMSNorm --position-embedding-type rope --norm-epsilon 1e-6
    --hidden-dropout 0 --attention-dropout 0 --no-gradient-accumulation-fusion --attention-softmax-in-fp32
    --exit-on-missing-checkpoint --no-masked-softmax-fusion --group-query-attention --num-query-groups 8
    --seed 42 --bf16 --min-lr 1.25e-7 --weight-decay 1e-1 --lr-warmup-fraction 0.01 --clip-grad 1.0
    --adam-beta1 0.9 --adam-beta2 0.95 --no-load-optim --no-load-rng --lr 1.25e-6
    --data-path /data/alpaca --split 100,0,0 --log-interval 1 --save-interval 2000 --eval-interval 2000
    --eval-iters 0 --log-throughput --finetune --stage sft --is-instruction-dataset --prompt-type qwen3
    --no-pad-to-seq-lengths --distributed-backend nccl --load /ckpt --save /save --transformer-impl local
    --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
"""


def cfg_of(text: str):
    return training_config_from_args(parse_args("posttrain_gpt", shlex.split(text)))


def test_mindspeed_llm_script_flags_parse_into_the_config():
    cfg = cfg_of(MINDSPEED_SCRIPT)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.parallel.sequence_parallel
    assert cfg.model.params_dtype == torch.bfloat16
    assert cfg.model.arch_overrides == {"num_layers": 28, "hidden_size": 1024, "ffn_hidden_size": 3072,
                                        "num_attention_heads": 16, "num_query_groups": 8, "kv_channels": 128,
                                        "max_position_embeddings": 32768, "vocab_size": 151936,
                                        "norm_eps": 1e-6, "rope_theta": 1e6}
    assert (cfg.model.recompute_granularity, cfg.model.recompute_method, cfg.model.recompute_num_layers) == \
        ("full", "uniform", 1)
    assert cfg.data.data_path == "/data/alpaca" and cfg.data.seq_length == 8192 and not cfg.data.pad_to_seq_length
    assert cfg.batch.global_batch_size == 16 and cfg.batch.train_iters == 2000
    assert cfg.optim.use_distributed_optimizer and cfg.optim.adam_beta2 == 0.95
    assert cfg.optim.schedule(2000) == (20, 2000)
    ck = cfg.checkpoint
    assert ck.finetune and not ck.load_optim and not ck.load_rng and ck.save == "/save" and ck.save_interval == 2000
    assert cfg.lora is None and cfg.seed == 42
    json.dumps(cfg.args)  # stored in checkpoints as plain data


BASE = "--data-path /d --load /m --seq-length 64 --global-batch-size 4 --train-iters 3 --lr 1e-4"


def test_exit_flags():
    ck = cfg_of(BASE).checkpoint
    assert (ck.exit_signal, ck.exit_interval, ck.exit_duration_mins) == (None, None, None)
    ck = cfg_of(f"{BASE} --exit-signal-handler --exit-interval 7 --exit-duration-in-mins 230").checkpoint
    assert (ck.exit_signal, ck.exit_interval, ck.exit_duration_mins) == ("SIGTERM", 7, 230.0)
    assert cfg_of(f"{BASE} --exit-signal-handler --exit-signal SIGUSR1").checkpoint.exit_signal == "SIGUSR1"
    assert cfg_of(f"{BASE} --exit-signal SIGUSR1").checkpoint.exit_signal is None  # only with the handler


@pytest.mark.parametrize("extra, message", [
    ("--stage dpo", "--stage dpo: the SFT trainer's config takes --stage sft"),
    ("--bf16 --fp16", "--bf16 or --fp16"),
    ("--transformer-impl transformer_engine", "transformer_engine: not supported"),
    ("--train-epochs 2", "exactly one of --train-iters and --train-epochs"),
    ("--recompute-method block", "need --recompute-granularity full"),
    ("--lr-warmup-fraction 0.1 --lr-warmup-iters 3", "--lr-warmup-fraction or --lr-warmup-iters"),
    ("--min-lr 1", "--min-lr 1.0 is above --lr"),
    ("--optimizer sgd --use-distributed-optimizer", "does not support --optimizer sgd"),
    ("--overlap-param-gather", "needs --use-distributed-optimizer"),
    ("--save-interval 5", "--save-interval needs --save"),
    ("--manual-gc-interval 5", "--manual-gc-interval needs --manual-gc"),
    ("--exit-interval 0", "--exit-interval 0: expected a positive number"),
    ("--loraplus-lr-ratio 16", "--loraplus-lr-ratio needs LoRA"),
    ("--lora-target-modules all-linear --loraplus-lr-ratio 0", "--loraplus-lr-ratio 0.0: expected a positive"),
    ("--exit-duration-in-mins 0", "--exit-duration-in-mins 0.0: expected a positive number"),
    ("--manual-gc --manual-gc-interval -1", "--manual-gc-interval -1: expected 0 or a positive number"),
    ("--lora-load /x", "--lora-load needs --lora-target-modules"),
    ("--micro-batch-size 0", "--micro-batch-size 0"),
    ("--tensor-model-parallel-size 0", "--tensor-model-parallel-size 0"),
    ("--ckpt-step -1", "--ckpt-step -1: expected an iteration number"),
])
def test_bad_combinations_refused(extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg_of(f"{BASE} {extra}")


@pytest.mark.parametrize("missing, message", [
    ("--data-path", "--data-path is required"), ("--load", "--load is required"),
    ("--global-batch-size", "--global-batch-size is required"), ("--seq-length", "--seq-length None"),
])
def test_required_flags(missing, message):
    parts = shlex.split(BASE)
    i = parts.index(missing)
    del parts[i:i + 2]
    with pytest.raises(UserError, match=message):
        training_config_from_args(parse_args("posttrain_gpt", parts))


def test_unknown_flag_and_two_data_paths():
    with pytest.raises(SystemExit):
        parse_args("posttrain_gpt", shlex.split(f"{BASE} --no-such-flag"))
    with pytest.raises(UserError, match="one prefix expected"):
        cfg_of(BASE.replace("/d", "/d /e"))


def test_global_batch_must_split_into_micro_batches():
    cfg = cfg_of(f"{BASE} --micro-batch-size 2")
    assert cfg.batch.microbatches(2) == 1
    with pytest.raises(UserError, match="not a multiple of --micro-batch-size 2 x data-parallel size 4"):
        cfg.batch.microbatches(4)


def _hf_dir(tmp_path, family, **overrides):
    from mindspeed_lora.tiny import tiny_hf_config

    d = tmp_path / family
    d.mkdir()
    tiny_hf_config(family, **overrides).save_pretrained(d)
    return str(d)


def test_architecture_from_hf_config_with_overrides_and_refusals(tmp_path):
    qwen2 = _hf_dir(tmp_path, "qwen2")
    src = inspect_load_dir(qwen2)
    assert src.kind == "hf"
    arch = resolve_arch(src, cfg_of(f"{BASE} --rotary-base 5000 --norm-epsilon 1e-5").model)
    assert arch.family == "qwen2" and arch.rope_theta == 5000 and arch.norm_eps == 1e-5
    with pytest.raises(UserError, match="--untie-embeddings-and-output-weights: .* ties the output layer"):
        resolve_arch(src, cfg_of(f"{BASE} --untie-embeddings-and-output-weights").model)
    with pytest.raises(UserError, match="--qk-layernorm: the qwen2 model"):
        resolve_arch(src, cfg_of(f"{BASE} --qk-layernorm").model)
    with pytest.raises(UserError, match="neither a Megatron checkpoint"):
        inspect_load_dir(str(tmp_path))
    with pytest.raises(UserError, match="no such directory"):
        inspect_load_dir(str(tmp_path / "missing"))


# what MindSpeed-LLM's own long-sequence packed script (tune_qwen3_32b_32K_full_pack_A3_ptd.sh) adds, less its
# context parallelism and virtual pipeline stages
MINDSPEED_PACK_EXTRA = """
    --use-flash-attn --use-fused-rotary-pos-emb --use-fused-swiglu --use-fused-rmsnorm --use-ascend-mc2
    --handler-name AlpacaStyleInstructionHandler --workers 4 --enable-thinking true --pack --neat-pack
    --reset-attention-mask --attention-mask-type general --enable-hf2mg-convert --model-type-hf qwen3
    --context-parallel-size 1 --context-parallel-algo ulysses_cp_algo --no-shared-storage
"""


def test_mindspeed_llm_features_not_here_parse_with_notes_or_are_refused():
    from mindspeed_lora.arguments.mindspeed_llm import MUST_BE_OFF

    cfg = cfg_of(MINDSPEED_SCRIPT + MINDSPEED_PACK_EXTRA)
    assert [n.split(":")[0] for n in cfg.notes] == ["--use-ascend-mc2", "--handler-name", "--workers", "--pack"]
    assert cfg.model.family == "qwen3" and cfg.data.neat_pack
    assert cfg_of(BASE).notes == []
    values = {"--context-parallel-size": "2", "--output-layer-slice-num": "2"}
    for flag, (kwargs, _, why) in MUST_BE_OFF.items():
        given = flag if kwargs.get("action") == "store_true" else \
            f"{flag} {values.get(flag, 'a b' if kwargs.get('nargs') else '4')}"
        with pytest.raises(UserError, match=f"^{flag} .*: " + why.split(" (")[0].split(";")[0]):
            cfg_of(f"{BASE} {given}")


def test_pairwise_flag_needs_the_dpo_stage():
    from mindspeed_lora.training import run_from_args

    with pytest.raises(UserError, match="--is-pairwise-dataset with --stage sft: pairwise"):
        run_from_args(parse_args("posttrain_gpt", shlex.split(f"{BASE} --is-pairwise-dataset")))
    with pytest.raises(UserError, match="--ref-load / --refer-model-iter with --stage sft: these name DPO's "
                                        "reference model"):
        run_from_args(parse_args("posttrain_gpt", shlex.split(f"{BASE} --ref-load /r --refer-model-iter 1")))
    with pytest.raises(UserError, match="^--refer-model-iter with --stage sft"):
        run_from_args(parse_args("posttrain_gpt", shlex.split(f"{BASE} --refer-model-iter 0")))


def test_model_type_and_rope_scaling_flags_are_checked_against_the_model(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    src = inspect_load_dir(_hf_dir(tmp_path, "llama3", rope_scaling=dict(rope)))
    flags = ("--rope-scaling-type llama3 --rope-scaling-factor 8 --low-freq-factor 1 --high-freq-factor 4 "
             "--rope-scaling-original-max-position-embeddings 64")
    got = resolve_arch(src, cfg_of(f"{BASE} --model-type-hf llama2 {flags}").model).rope_scaling
    assert {k: got[k] for k in rope} == rope
    with pytest.raises(UserError, match="--model-type-hf qwen3: --load .* is a llama3 model"):
        resolve_arch(src, cfg_of(f"{BASE} --model-type-hf qwen3").model)
    with pytest.raises(UserError, match="rope scaling factor 16.0 on the command line, but --load .* has 8.0"):
        resolve_arch(src, cfg_of(f"{BASE} --rope-scaling-factor 16").model)
    alias = cfg_of(f"{BASE} --original-max-position-embeddings 64").model.rope_scaling
    assert alias == {"original_max_position_embeddings": 64}
    with pytest.raises(UserError, match="--original-max-position-embeddings 64 and .* 32 disagree"):
        cfg_of(f"{BASE} --original-max-position-embeddings 64 --rope-scaling-original-max-position-embeddings 32")
    with pytest.raises(UserError, match="--rotary-percent 0.5: partial rotary embeddings are not supported"):
        cfg_of(f"{BASE} --rotary-percent 0.5")
    assert cfg_of(f"{BASE} --rotary-percent 1.0 --vocab-size 128256").model.rope_scaling == {}
    plain = inspect_load_dir(_hf_dir(tmp_path, "qwen3"))
    with pytest.raises(UserError, match="rope scaling rope_type 'llama3' on the command line, but .* has None"):
        resolve_arch(plain, cfg_of(f"{BASE} --rope-scaling-type llama3").model)


def test_yarn_tuning_flags_are_checked_with_hf_defaults(tmp_path):
    """MindSpeed-LLM's YaRN scripts pass beta-fast 32 / beta-slow 1 (HF's defaults, absent from Qwen's config)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    src = inspect_load_dir(_hf_dir(tmp_path, "qwen3", rope_scaling=dict(yarn), max_position_embeddings=128))
    ok = "--rope-scaling-type yarn --rope-scaling-factor 4 --rope-scaling-beta-fast 32 --rope-scaling-beta-slow 1"
    assert resolve_arch(src, cfg_of(f"{BASE} {ok}").model).rope_scaling == yarn
    with pytest.raises(UserError, match="rope scaling beta_fast 16.0 on the command line, but --load .* has 32"):
        resolve_arch(src, cfg_of(f"{BASE} --rope-scaling-beta-fast 16").model)
    # DeepSeek's mscale pair changes the attention factor (to 1 here): a config without them is refused
    with pytest.raises(UserError, match="rope scaling mscale 1.0 on the command line, but --load .* has None"):
        resolve_arch(src, cfg_of(f"{BASE} --rope-scaling-mscale 1 --rope-scaling-mscale-all-dim 1").model)
    with pytest.raises(UserError, match="--model-type-hf: unknown model type 'gpt9'"):
        cfg_of(f"{BASE} --model-type-hf gpt9")


def _megatron_dir(path, arch, tp=1, pp=1, num_layer_list=None):
    """A minimal checkpoint of this project: metadata, latest iteration and shard (0, 0) of one tensor."""
    from mindspeed_lora.checkpoint import megatron_io

    iter_dir = path / megatron_io.iteration_dir_name(1)
    megatron_io.atomic_torch_save({"model": {"embedding.word_embeddings.weight": torch.zeros(2, 2)}},
                                  megatron_io.shard_path(str(iter_dir), 0, 0, pp))
    (path / megatron_io.LATEST).write_text("1")
    megatron_io.write_metadata(str(path), {"arch": arch.to_dict(), "tensor_model_parallel_size": tp,
                                           "pipeline_model_parallel_size": pp, "num_layer_list": num_layer_list})
    return str(path)


def test_checkpoint_of_another_layout_or_model_refused(tmp_path):
    import dataclasses

    from mindspeed_lora.models.builder import ParallelOptions

    src = inspect_load_dir(_hf_dir(tmp_path, "qwen3"))
    arch = resolve_arch(src, cfg_of(BASE).model)
    ck = inspect_load_dir(_megatron_dir(tmp_path / "ck", arch))
    assert ck.kind == "megatron" and ck.metadata["tensor_model_parallel_size"] == 1
    assert resolve_arch(ck, cfg_of(BASE).model) == arch
    check_layout(ck, arch, ParallelOptions())
    with pytest.raises(UserError, match="tensor-model-parallel-size 1, pipeline-model-parallel-size 1 .* "
                                        "this run uses 2, 1"):
        check_layout(ck, arch, ParallelOptions(tensor_model_parallel_size=2))
    with pytest.raises(UserError, match=r"this run uses 1, 2 \(\[1, 1\]\).*--num-layer-list 1,1"):
        check_layout(ck, arch, ParallelOptions(pipeline_model_parallel_size=2))
    # another model is named as such even when its layer count (and so its layout) differs too
    with pytest.raises(UserError, match="--lora-load .*a different model .*num_layers 2 vs 4"):
        check_layout(ck, dataclasses.replace(arch, num_layers=4), ParallelOptions(), what="--lora-load")
    with pytest.raises(UserError, match="a different model .*hidden_size 64 vs 128"):
        check_layout(ck, dataclasses.replace(arch, hidden_size=128), ParallelOptions())
    pp2 = inspect_load_dir(_megatron_dir(tmp_path / "pp2", arch, pp=2, num_layer_list=[1, 1]))
    with pytest.raises(UserError, match=r"layers per stage \[1, 1\]"):
        check_layout(pp2, arch, ParallelOptions())


def test_megatron_checkpoint_without_metadata_refused(tmp_path):
    from mindspeed_lora.checkpoint import megatron_io

    (tmp_path / megatron_io.LATEST).write_text("1")
    with pytest.raises(UserError, match="--load .*: a Megatron checkpoint without mindspeed_lora.json .*import it "
                                        "once with convert_ckpt.py .*--hf-cfg-dir"):
        inspect_load_dir(str(tmp_path))


def test_ckpt_step_picks_an_iteration_of_load_or_of_the_adapter(tmp_path):
    """--ckpt-step N (Megatron-LM's flag): the iteration read of --lora-load when given, else of --load; an
    iteration that is not there, or an HF dir, is refused naming the flag and the saved iterations; the
    latest pointer is not read (nor needed) when an iteration is asked for."""
    import shutil

    from mindspeed_lora.checkpoint import megatron_io
    from mindspeed_lora.checkpoint.sources import MegatronCheckpoint
    from mindspeed_lora.models.builder import ParallelOptions

    ck = cfg_of(f"{BASE} --ckpt-step 2").checkpoint
    assert (ck.ckpt_step, ck.load_iteration, ck.lora_load_iteration) == (2, 2, None)
    ck = cfg_of(f"{BASE} --ckpt-step 2 --lora-target-modules all-linear --lora-load /a").checkpoint
    assert (ck.load_iteration, ck.lora_load_iteration) == (None, 2)
    assert cfg_of(BASE).checkpoint.ckpt_step is None

    hf = _hf_dir(tmp_path, "qwen3")
    arch = resolve_arch(inspect_load_dir(hf), cfg_of(BASE).model)
    path = _megatron_dir(tmp_path / "ck", arch)
    shutil.copytree(f"{path}/iter_0000001", f"{path}/iter_0000004")
    (tmp_path / "ck" / "iter_0000005.tmp-abc").mkdir()  # a staging leftover is no iteration
    (tmp_path / "ck" / megatron_io.LATEST).write_text("4")
    assert megatron_io.saved_iterations(path) == [1, 4]
    assert inspect_load_dir(path).iteration == 4
    assert inspect_load_dir(path, iteration=1).iteration == 1
    with pytest.raises(UserError, match=r"^--ckpt-step 2: --load .*/ck: no iteration 2 \(no iter_0000002; saved "
                                        r"iterations: 1, 4\)$"):
        inspect_load_dir(path, iteration=2)
    with pytest.raises(UserError, match=r"^--refer-model-iter 3: --ref-load .*: no iteration 3"):
        inspect_load_dir(path, "--ref-load", 3, "--refer-model-iter")
    with pytest.raises(UserError, match=r"^--ckpt-step 1: --load .*/qwen3 is an HF model directory"):
        inspect_load_dir(hf, iteration=1)
    (tmp_path / "ck" / megatron_io.LATEST).unlink()  # the pointer is not needed to read a given iteration
    source = inspect_load_dir(path, iteration=1)
    check_layout(source, arch, ParallelOptions())
    assert MegatronCheckpoint(path, iteration=1).iter_dir == f"{path}/iter_0000001"
    with pytest.raises(UserError, match="no latest_checkpointed_iteration.txt"):
        inspect_load_dir(path)


def test_a_sequence_longer_than_a_sliding_window_is_refused_before_anything_is_built(tmp_path):
    from mindspeed_lora.data.sft_dataset import missing_files
    from mindspeed_lora.training.sft import SFTTrainer

    prefix = str(tmp_path / "d")
    for f in missing_files(prefix):  # the prefix check only looks for the files
        open(f, "wb").close()
    hf = _hf_dir(tmp_path, "mistral", sliding_window=32)
    args = f"--data-path {prefix} --load {hf} --global-batch-size 4 --train-iters 3 --lr 1e-4 --seq-length"
    with pytest.raises(UserError, match="--seq-length 64: this mistral model's layers attend to a sliding window "
                                        "of 32 tokens"):
        SFTTrainer(cfg_of(f"{args} 64")).setup()
    with pytest.raises(UserError, match="d_packed_input_ids_document.idx"):  # 32 passes on to the (empty) data
        SFTTrainer(cfg_of(f"{args} 32")).setup()
