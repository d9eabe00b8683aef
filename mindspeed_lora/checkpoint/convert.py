"""HF <-> Megatron checkpoint conversion, Megatron resharding, LoRA merge and PEFT adapter export/import.

Every direction is the same table (``models.family`` weight rules bound per stage by ``weight_map.stage_rules``,
adapters by ``lora_layout.adapter_rules``) and the same shard transforms (``sharding.read_shard`` /
``merge_shards``) applied to a tensor source with HF names (``checkpoint.sources``):

    hf -> mg        HF dir ──read_shard per (pp, tp)──▶ streamed model_optim_rng.pt files
    mg -> hf        Megatron ckpt ──merge_shards per rule──▶ streamed safetensors (+ LoRA merged in fp32)
    mg -> mg        Megatron ckpt seen as HF tensors ──read_shard for the new TP/PP──▶ Megatron ckpt
    adapter export  LoRA ckpt ──merge_shards──▶ PEFT adapter dir;  import: the inverse

Tensors are read one slice at a time and written as soon as they are complete, so peak memory is about one
merged tensor, not the model. Outputs are written into ``<save-dir>.tmp-*`` and renamed when complete (and,
with ``--test-convert-precision``, only when the precision test passed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import uuid

import torch
from tqdm import tqdm

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.hf_writer import (
    SafetensorsWriter,
    TensorPlan,
    copy_side_files,
    write_hf_config,
)
from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig, adapter_rules
from mindspeed_lora.checkpoint.lora_merge import is_adapted, merged_parts
from mindspeed_lora.checkpoint.peft_adapter import export_adapter, is_peft_adapter_dir, read_adapter
from mindspeed_lora.checkpoint.sharding import read_shard
from mindspeed_lora.checkpoint.sources import (
    HF_DROPPED,
    HFSource,
    MegatronAsHF,
    MegatronCheckpoint,
    first_of,
    model_order,
)
from mindspeed_lora.checkpoint.weight_map import BoundRule, stage_rules
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch, dtype_from_name, dtype_name
from mindspeed_lora.models.builder import ParallelOptions, layer_counts
from mindspeed_lora.models.family import COLUMN, GATE_UP, QKV, VOCAB, read_hf_config

MG2HF_SUBDIR = "mg2hf"


# ---------------------------------------------------------------------------------------------- output dirs

class StagedDir:
    """An output directory written under ``<final>.tmp-<token>`` and renamed to ``final`` by ``publish``.

    An existing non-empty ``final`` is refused unless ``overwrite``; then it is replaced only once the new
    one is complete. Leaving the ``with`` block without publishing removes the staged directory.
    """

    def __init__(self, final: str, overwrite: bool, what: str = "--save-dir"):
        final = os.path.abspath(final)
        if os.path.exists(final) and not os.path.isdir(final):
            raise UserError(f"{what} {final}: exists and is not a directory")
        if os.path.isdir(final) and os.listdir(final) and not overwrite:
            raise UserError(f"{what} {final}: exists and is not empty; choose a new directory or pass "
                            "--overwrite-save-dir to replace it")
        self.final = final
        self.token = uuid.uuid4().hex[:12]
        self.path = f"{final}.tmp-{self.token}"
        self.published = False

    def __enter__(self) -> "StagedDir":
        os.makedirs(self.path)
        return self

    def publish(self) -> None:
        if os.path.isdir(self.final) and os.listdir(self.final):
            old = f"{self.final}.old-{self.token}"
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(self.final):
                os.rmdir(self.final)
            os.replace(self.path, self.final)
        self.published = True

    def __exit__(self, *exc) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)


def _bar(cfg: ConvertConfig, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not cfg.progress, file=sys.stderr)


def _lora_flags(cfg: ConvertConfig) -> LoraCheckpointConfig | None:
    return LoraCheckpointConfig.from_metadata(cfg.lora_flags, "--lora-* flags") if cfg.lora_flags else None


def _check_family(cfg: ConvertConfig, arch: ModelArch, source: str) -> None:
    if cfg.require_qkv_bias and not arch.qkv_bias:
        raise UserError(f"--add-qkv-bias: {source} describes a {arch.family} model, which has no q/k/v biases")
    if cfg.model_type_hf is None or cfg.model_type_hf == arch.family:
        return
    if cfg.model_type_hf_generic:
        print(f"note: --model-type-hf llama2 is MindSpeed-LLM's generic name; {source} says {arch.family}, "
              "which is what converts", file=sys.stderr)
        return
    raise UserError(f"--model-type-hf {cfg.model_type_hf}: {source} describes a {arch.family} model")


def _target_parallel(cfg: ConvertConfig, arch: ModelArch) -> ParallelOptions:
    arch.check_tensor_parallel(cfg.target_tp, "--target-tensor-parallel-size")
    parallel = ParallelOptions(tensor_model_parallel_size=cfg.target_tp, pipeline_model_parallel_size=cfg.target_pp,
                               num_layer_list=cfg.num_layer_list if cfg.target_pp > 1 else None)
    if cfg.num_layer_list is not None and cfg.target_pp == 1 and cfg.num_layer_list != [arch.num_layers]:
        raise UserError(f"--num-layer-list {cfg.num_layer_list} needs --target-pipeline-parallel-size "
                        f"{len(cfg.num_layer_list)}")
    try:
        layer_counts(arch, parallel)  # refuses a PP size or layer list that does not fit the model
    except UserError as e:
        raise UserError(str(e).replace("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")) from e
    return parallel


def _model_args(arch: ModelArch, parallel: ParallelOptions, dtype: torch.dtype) -> dict:
    """The ``args`` entry of each shard: plain data (MindSpeed-LLM stores an argparse.Namespace there)."""
    return {"tensor_model_parallel_size": parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
            "num_layer_list": layer_counts(arch, parallel), "num_layers": arch.num_layers,
            "hidden_size": arch.hidden_size, "params_dtype": dtype_name(dtype), "model_type_hf": arch.family}


def _metadata(arch: ModelArch, parallel: ParallelOptions, dtype: torch.dtype, lora: LoraCheckpointConfig | None,
              iteration: int) -> dict:
    from mindspeed_lora.training.model import metadata_for

    return metadata_for(arch, parallel, dtype, lora.to_metadata() if lora else None, iteration)


def _write_hf_config_dir(root: str, config_dir: str, tokenizer_dir: str | None) -> None:
    dst = os.path.join(root, megatron_io.HF_CONFIG_DIR)
    os.makedirs(dst, exist_ok=True)
    shutil.copy2(os.path.join(config_dir, "config.json"), os.path.join(dst, "config.json"))
    copy_side_files(tokenizer_dir or config_dir, dst)


# ---------------------------------------------------------------------------------------------- writers

def write_megatron(source, arch: ModelArch, parallel: ParallelOptions, rules_for_stage, dtype_of, root: str,
                   iteration: int, args: dict, bar) -> None:
    """Megatron shards of ``source`` for every (pp, tp) of ``parallel`` under ``root``, one tensor in memory.

    ``rules_for_stage(pp)`` gives the stage's table; ``dtype_of(rule)`` the written dtype of a rule's tensor.
    """
    kw = dict(num_heads=arch.num_attention_heads, num_groups=arch.num_query_groups, head_dim=arch.kv_channels)
    tp_size, pp_size = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    iter_dir = os.path.join(root, megatron_io.iteration_dir_name(iteration))
    extra = {"iteration": iteration, "checkpoint_version": megatron_io.CHECKPOINT_VERSION, "args": args}
    for pp in range(pp_size):
        rules = rules_for_stage(pp)
        keys = model_order(rules)
        for tp in range(tp_size):
            def shard(key, reader, tp=tp, rules=rules):
                rule = rules[key]
                shapes = [source.shape(n) for n in rule.hf_names]
                return read_shard(rule.kind, rule.hf_names, shapes, reader, tp, tp_size, **kw)

            specs = {k: (tuple(shard(k, source.meta_read).shape), dtype_of(rules[k])) for k in keys}

            def produce(key, shard=shard, specs=specs):
                bar.update(1)
                return shard(key, source.read).to(specs[key][1])

            megatron_io.write_shard_streaming(megatron_io.shard_path(iter_dir, tp, pp, pp_size), specs, produce,
                                              extra)
    megatron_io.atomic_write_text(os.path.join(root, megatron_io.LATEST), str(iteration))


def write_hf_model(view: MegatronAsHF, root: str, dtype: torch.dtype, max_shard_bytes: int, bar,
                   adapter: MegatronAsHF | None = None, lora: LoraCheckpointConfig | None = None) -> int:
    """Sharded safetensors + index of ``view``'s base weights (with ``adapter`` merged); returns bytes written."""
    plan, items = [], []
    for pp, rule in view.rules:
        names = [n for n in rule.hf_names if view.owns(pp, rule, n)]
        plan += [TensorPlan(n, view.shape(n), dtype) for n in names]
        items.append((pp, rule, names))
    writer = SafetensorsWriter(root, plan, max_shard_bytes)
    for pp, rule, names in items:
        bar.update(1)
        if not names:
            continue  # the last stage's copy of a tied embedding
        if rule.kind in (VOCAB, COLUMN) and not (lora and is_adapted(rule, lora)):
            # merge_shards of a row-split tensor is the TP shards stacked: write them one after the other
            # instead of building the whole (the embedding and output layer are the largest tensors)
            writer.write_parts(names[0], (view.ckpt.read(tp, pp, rule.mcore_key).to(dtype)
                                          for tp in range(view.ckpt.tp)))
            continue
        parts = view.merged(pp, rule)
        parts = merged_parts(rule, parts, adapter, lora, dtype) if lora else [p.to(dtype) for p in parts]
        for name, t in zip(rule.hf_names, parts):
            if name in names:
                writer.write(name, t)
    writer.close()
    writer.write_index()
    return writer.total_size


# ---------------------------------------------------------------------------------------------- checks

def _check_hf_tensors(source: HFSource, arch: ModelArch) -> None:
    """Every tensor the table needs is there with the shape config.json implies; no tensor is left over."""
    rules = stage_rules(arch, ParallelOptions(), 0)
    needed = {n: r for r in rules.values() for n in r.hf_names}
    missing = sorted(set(needed) - set(source.keys()))
    if missing:
        raise UserError(f"{source.model_dir}: tensor {first_of(missing)} not found")
    dropped = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    unknown = sorted(n for n in source.keys() if n not in needed and n not in dropped and not HF_DROPPED.search(n))
    if unknown:
        raise UserError(f"{source.model_dir}: tensor {unknown[0]!r} has no place in a {arch.family} model "
                        f"(the weight table does not map it)"
                        + (f"; {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    q_rows = arch.num_attention_heads * arch.kv_channels
    kv_rows = arch.num_query_groups * arch.kv_channels
    for name, rule in needed.items():
        shape = source.shape(name)
        want = None
        if rule.kind == VOCAB:
            want = (arch.vocab_size, arch.hidden_size)
        elif rule.kind == QKV:
            rows = q_rows if name == rule.hf_names[0] else kv_rows
            want = (rows, arch.hidden_size) if len(shape) == 2 else (rows,)
        elif rule.kind == GATE_UP:
            want = (arch.ffn_hidden_size, arch.hidden_size)
        if want is not None and tuple(shape) != want:
            raise UserError(f"{source.model_dir}: {name} has shape {tuple(shape)}; config.json implies {want}")


def _hf_dtype(cfg: ConvertConfig, arch: ModelArch, source: HFSource, config: dict) -> torch.dtype:
    """--params-dtype, else the HF config's dtype, else the weights' own dtype (never a silent fp16)."""
    if cfg.params_dtype:
        return dtype_from_name(cfg.params_dtype)
    name = config.get("dtype") or config.get("torch_dtype")
    if name:
        return dtype_from_name(name)
    return source.dtype(stage_rules(arch, ParallelOptions(), 0)["embedding.word_embeddings.weight"].hf_names[0])


def _same_model(a: ModelArch, b: ModelArch, where: str) -> None:
    diffs = [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(ModelArch)
             if f.name != "torch_dtype" and getattr(a, f.name) != getattr(b, f.name)]
    if diffs:
        raise UserError(f"{where}: the LoRA checkpoint belongs to another model ({'; '.join(diffs)}; base vs LoRA)")


# ---------------------------------------------------------------------------------------------- precision

def _ensure_single_rank_parallel() -> None:
    from megatron.core import parallel_state

    from mindspeed_lora.parallel import initialize

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        initialize(1, 1)


def _hf_model_from(config_dir: str, view):
    """An fp32 HF model from a config dir with the weights of a source with HF names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {n: view.read(n).float() for n in view.keys()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"{view.model_dir}: weights do not fit the HF model: missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _precision(cfg: ConvertConfig, hf_model, mcore_model, arch: ModelArch):
    from mindspeed_lora.checkpoint.precision import compare_models

    report = compare_models(hf_model, mcore_model, arch.vocab_size)
    print(f"precision test: {report.line()}", flush=True)
    if not report.mean_diff < cfg.precision_threshold:
        raise PrecisionFailure(report, cfg.precision_threshold)
    return report


class PrecisionFailure(Exception):
    """The converted model's logits differ from the source's by more than the threshold."""

    def __init__(self, report, threshold: float):
        super().__init__(f"precision test FAILED: mean |logit diff| {report.mean_diff:.3e} >= threshold "
                         f"{threshold} (max {report.max_diff:.3e}, {report.argmax_mismatches} argmax mismatches); "
                         "nothing was written to --save-dir")
        self.report = report


# ---------------------------------------------------------------------------------------------- directions

@dataclasses.dataclass
class ConvertResult:
    save_dir: str
    tensors: int
    seconds: float
    precision: object | None = None


def hf_to_mg(cfg: ConvertConfig) -> ConvertResult:
    t0 = time.time()
    config_path = os.path.join(cfg.load_dir, "config.json")
    config = read_hf_config(cfg.load_dir)
    arch = ModelArch.from_hf_config(config, config_path)
    _check_family(cfg, arch, config_path)
    parallel = _target_parallel(cfg, arch)
    source = HFSource(cfg.load_dir)
    _check_hf_tensors(source, arch)
    dtype = _hf_dtype(cfg, arch, source, config)
    arch = dataclasses.replace(arch, torch_dtype=dtype_name(dtype))
    total = sum(len(stage_rules(arch, parallel, pp)) for pp in range(cfg.target_pp)) * cfg.target_tp
    with StagedDir(cfg.save_dir, cfg.overwrite) as out:
        with _bar(cfg, total, "hf -> mg") as bar:
            write_megatron(source, arch, parallel, lambda pp: stage_rules(arch, parallel, pp), lambda rule: dtype,
                           out.path, 1, _model_args(arch, parallel, dtype), bar)
        megatron_io.write_metadata(out.path, _metadata(arch, parallel, dtype, None, 1))
        _write_hf_config_dir(out.path, cfg.load_dir, cfg.tokenizer_dir)
        report = None
        if cfg.test_precision:
            from transformers import AutoModelForCausalLM

            from mindspeed_lora.checkpoint.precision import megatron_model_from_checkpoint

            _ensure_single_rank_parallel()
            written = MegatronCheckpoint(out.path, "converted checkpoint")
            hf = AutoModelForCausalLM.from_pretrained(cfg.load_dir, dtype=torch.float32)
            report = _precision(cfg, hf, megatron_model_from_checkpoint(written), arch)
        out.publish()
    return ConvertResult(out.final, total, time.time() - t0, report)


def import_adapter(cfg: ConvertConfig) -> ConvertResult:
    """PEFT adapter dir -> a Megatron LoRA checkpoint (adapter tensors only) for the target TP/PP."""
    t0 = time.time()
    if cfg.test_precision:
        raise UserError("--test-convert-precision compares whole models; an adapter import has no base model to "
                        "run (convert the base with hf -> mg and test that)")
    base_dir = cfg.hf_cfg_dir
    if base_dir is None:
        with open(os.path.join(cfg.load_dir, "adapter_config.json"), encoding="utf-8") as f:
            named = json.load(f).get("base_model_name_or_path")
        if named and os.path.isfile(os.path.join(named, "config.json")):
            base_dir = named
        else:
            raise UserError(f"--load-dir {cfg.load_dir}: a PEFT adapter whose base model ({named!r}) is not a local "
                            "HF dir; give the base model's directory as --hf-cfg-dir")
    config_path = os.path.join(base_dir, "config.json")
    arch = ModelArch.from_hf_config(read_hf_config(base_dir), config_path)
    _check_family(cfg, arch, config_path)
    parallel = _target_parallel(cfg, arch)
    source, lora = read_adapter(cfg.load_dir, arch, _lora_flags(cfg))
    first = next(iter(source.tensors.values()))
    dtype = dtype_from_name(cfg.params_dtype) if cfg.params_dtype else first.dtype
    rules = [adapter_rules(arch, parallel, pp, lora.target_modules) for pp in range(cfg.target_pp)]
    total = sum(len(r) for r in rules) * cfg.target_tp
    with StagedDir(cfg.save_dir, cfg.overwrite) as out:
        with _bar(cfg, total, "PEFT adapter -> mg") as bar:
            write_megatron(source, arch, parallel, lambda pp: rules[pp], lambda rule: dtype, out.path, 1,
                           _model_args(arch, parallel, dtype), bar)
        megatron_io.write_metadata(out.path, _metadata(arch, parallel, dtype, lora, 1))
        _write_hf_config_dir(out.path, base_dir, cfg.tokenizer_dir)
        out.publish()
    return ConvertResult(out.final, total, time.time() - t0)


def _hf_output_dir(cfg: ConvertConfig) -> str:
    """MindSpeed-LLM's mg -> hf takes the original HF dir as --save-dir and writes into its mg2hf/."""
    if os.path.isfile(os.path.join(cfg.save_dir, "config.json")):
        out = os.path.join(cfg.save_dir, MG2HF_SUBDIR)
        print(f"note: --save-dir {cfg.save_dir} is an HF model dir; writing into {out} (as MindSpeed-LLM does)",
              file=sys.stderr)
        return out
    return cfg.save_dir


def _megatron_source(cfg: ConvertConfig, path: str, what: str) -> MegatronCheckpoint:
    """A checkpoint of this project, or one of MindSpeed-LLM / Megatron-LM described from the HF config of
    --hf-cfg-dir (or of an HF --save-dir, MindSpeed-LLM's way of naming it for mg -> hf)."""
    config_dir = cfg.hf_cfg_dir
    if config_dir is None and os.path.isfile(os.path.join(cfg.save_dir, "config.json")):
        config_dir = cfg.save_dir
    return MegatronCheckpoint(path, what, config_dir)


def _config_dir(cfg: ConvertConfig, ckpt: MegatronCheckpoint) -> str:
    for candidate in (cfg.hf_cfg_dir, ckpt.hf_config_dir, cfg.save_dir):
        if candidate and os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise UserError(f"{ckpt.what} {ckpt.path}: no {megatron_io.HF_CONFIG_DIR}/config.json; give the HF model's "
                    "config dir as --hf-cfg-dir")


def mg_to_hf(cfg: ConvertConfig) -> ConvertResult:
    """A merged HF model: the base checkpoint, with the LoRA of --lora-load (or of the checkpoint itself)."""
    t0 = time.time()
    base = _megatron_source(cfg, cfg.load_dir, "--load-dir")
    _check_family(cfg, base.arch, os.path.join(cfg.load_dir, megatron_io.METADATA))
    if not base.has_base:
        raise UserError(f"--load-dir {cfg.load_dir}: holds LoRA tensors only; give the base model's checkpoint as "
                        "--load-dir and this one as --lora-load (or pass --save-lora-to-hf for a PEFT adapter)")
    base.check_keys(True, None)
    adapter, lora = None, None
    lora_ckpt = _megatron_source(cfg, cfg.lora_load, "--lora-load") if cfg.lora_load else \
        (base if base.has_adapter else None)
    if lora_ckpt is not None:
        if not lora_ckpt.has_adapter:
            raise UserError(f"--lora-load {cfg.lora_load}: no LoRA tensors (lora_A / lora_B) in its shards")
        lora = lora_ckpt.adapter_config(_lora_flags(cfg))
        _same_model(base.arch, lora_ckpt.arch, f"--lora-load {lora_ckpt.path}")
        lora_ckpt.check_keys(False, lora)
        adapter = MegatronAsHF(lora_ckpt, base=False, lora=lora)
        print(f"merging LoRA (r={lora.r}, alpha={lora.alpha}, scaling {lora.scaling:g}, "
              f"targets {' '.join(lora.target_modules)}) from {lora_ckpt.path}", file=sys.stderr)
    dtype = dtype_from_name(cfg.params_dtype or base.params_dtype or base.arch.torch_dtype)
    config_dir = _config_dir(cfg, base)
    view = MegatronAsHF(base)
    with StagedDir(_hf_output_dir(cfg), cfg.overwrite) as out:
        with _bar(cfg, len(view.rules), "mg -> hf") as bar:
            write_hf_model(view, out.path, dtype, cfg.max_shard_size, bar, adapter, lora)
        write_hf_config(out.path, read_hf_config(config_dir), dtype_name(dtype))
        copy_side_files(cfg.tokenizer_dir or config_dir, out.path)
        report = None
        if cfg.test_precision:
            from transformers import AutoModelForCausalLM

            from mindspeed_lora.checkpoint.precision import megatron_model_from_checkpoint

            _ensure_single_rank_parallel()
            mcore = megatron_model_from_checkpoint(base, (lora, lora_ckpt) if lora else None)
            hf = AutoModelForCausalLM.from_pretrained(out.path, dtype=torch.float32)
            report = _precision(cfg, hf, mcore, base.arch)
        out.publish()
    return ConvertResult(out.final, len(view.rules), time.time() - t0, report)


def export_lora(cfg: ConvertConfig) -> ConvertResult:
    """--save-lora-to-hf: the LoRA tensors of --lora-load (else --load-dir) as a PEFT adapter dir.

    With --test-convert-precision the base model must be known (--load-dir with --lora-load, or a checkpoint
    holding both): peft's PeftModel over the HF base with the written adapter is compared with megatron-core
    running the base and the adapter before anything is published."""
    t0 = time.time()
    what, path = ("--lora-load", cfg.lora_load) if cfg.lora_load else ("--load-dir", cfg.load_dir)
    ckpt = _megatron_source(cfg, path, what)
    base = None
    if cfg.test_precision:
        base = _megatron_source(cfg, cfg.load_dir, "--load-dir") if cfg.lora_load else ckpt
        if not base.has_base:
            raise UserError("--test-convert-precision with --save-lora-to-hf runs the adapter on its base model: "
                            "give the base checkpoint as --load-dir and the adapter as --lora-load")
        _same_model(base.arch, ckpt.arch, f"{what} {path}")
    if not ckpt.has_adapter:
        raise UserError(f"{what} {path}: no LoRA tensors (lora_A / lora_B) in its shards")
    lora = ckpt.adapter_config(_lora_flags(cfg))
    ckpt.check_keys(False, lora)
    view = MegatronAsHF(ckpt, base=False, lora=lora)
    dtype = dtype_from_name(cfg.params_dtype) if cfg.params_dtype else None
    base_model = os.path.abspath(cfg.hf_cfg_dir) if cfg.hf_cfg_dir else None  # the HF base, when named
    report = None
    with StagedDir(_hf_output_dir(cfg), cfg.overwrite) as out:
        with _bar(cfg, len(view.keys()), "LoRA -> PEFT adapter") as bar:
            export_adapter(view, lora, out.path, dtype, base_model, bar)
        if base is not None:
            from peft import PeftModel

            from mindspeed_lora.checkpoint.precision import megatron_model_from_checkpoint

            _ensure_single_rank_parallel()
            mcore = megatron_model_from_checkpoint(base, (lora, ckpt))
            hf = PeftModel.from_pretrained(_hf_model_from(_config_dir(cfg, base), MegatronAsHF(base)), out.path)
            report = _precision(cfg, hf.eval(), mcore, base.arch)
        out.publish()
    return ConvertResult(out.final, len(view.keys()), time.time() - t0, report)


def mg_to_mg(cfg: ConvertConfig) -> ConvertResult:
    """Reshard a Megatron checkpoint (base, adapter or both) to the target TP/PP."""
    t0 = time.time()
    src = _megatron_source(cfg, cfg.load_dir, "--load-dir")
    arch = src.arch
    _check_family(cfg, arch, os.path.join(cfg.load_dir, megatron_io.METADATA))
    lora = src.adapter_config(_lora_flags(cfg)) if src.has_adapter else None
    if cfg.test_precision and not src.has_base:
        raise UserError("--test-convert-precision compares whole models; this checkpoint holds LoRA tensors only")
    src.check_keys(src.has_base, lora)
    parallel = _target_parallel(cfg, arch)
    view = MegatronAsHF(src, base=src.has_base, lora=lora)
    forced = dtype_from_name(cfg.params_dtype) if cfg.params_dtype else None

    def rules_for(pp: int) -> dict[str, BoundRule]:
        rules = dict(stage_rules(arch, parallel, pp)) if src.has_base else {}
        if lora is not None:
            rules.update(adapter_rules(arch, parallel, pp, lora.target_modules))
        return rules

    def dtype_of(rule: BoundRule) -> torch.dtype:
        return forced or view.dtype(rule.hf_names[0])

    dtype = forced or dtype_from_name(src.params_dtype or arch.torch_dtype)
    if forced:
        arch = dataclasses.replace(arch, torch_dtype=dtype_name(forced))
    total = sum(len(rules_for(pp)) for pp in range(cfg.target_pp)) * cfg.target_tp
    with StagedDir(cfg.save_dir, cfg.overwrite) as out:
        with _bar(cfg, total, "mg -> mg") as bar:
            write_megatron(view, arch, parallel, rules_for, dtype_of, out.path, src.iteration,
                           _model_args(arch, parallel, dtype), bar)
        megatron_io.write_metadata(out.path, _metadata(arch, parallel, dtype, lora, src.iteration))
        if src.hf_config_dir:
            _write_hf_config_dir(out.path, src.hf_config_dir, cfg.tokenizer_dir)
        report = None
        if cfg.test_precision:
            from mindspeed_lora.checkpoint.precision import megatron_model_from_checkpoint

            _ensure_single_rank_parallel()
            written = MegatronCheckpoint(out.path, "converted checkpoint")
            hf = _hf_model_from(_config_dir(cfg, src), MegatronAsHF(src))
            report = _precision(cfg, hf, megatron_model_from_checkpoint(written), arch)
        out.publish()
    return ConvertResult(out.final, total, time.time() - t0, report)


def convert(cfg: ConvertConfig) -> ConvertResult:
    """Run the conversion ``cfg`` asks for; raises UserError on bad input, PrecisionFailure on a failed test."""
    direction = (cfg.load_model_type, cfg.save_model_type)
    if direction == ("hf", "mg"):
        return import_adapter(cfg) if is_peft_adapter_dir(cfg.load_dir) else hf_to_mg(cfg)
    if direction == ("mg", "hf"):
        return export_lora(cfg) if cfg.save_lora_to_hf else mg_to_hf(cfg)
    return mg_to_mg(cfg)


def run_from_args(args) -> int:
    """convert_ckpt.py: parse -> convert -> report; returns the exit code (1 when the precision test fails)."""
    from mindspeed_lora.arguments.convert import convert_config_from_args

    cfg = convert_config_from_args(args)
    try:
        result = convert(cfg)
    except PrecisionFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if cfg.test_precision:
            from mindspeed_lora.parallel import shutdown

            shutdown()
    print(f"converted {result.tensors} tensors to {result.save_dir} in {result.seconds:.1f} s", flush=True)
    return 0
