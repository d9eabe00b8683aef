"""PEFT adapter directories <-> the LoRA tensors of a Megatron checkpoint.

Export: q, k and v (gate and up) each get the fused linear's A (identical copies) and their own rows of B;
o_proj and down_proj map directly. Import is the inverse and refuses what cannot be fused: q/k/v (or
gate/up) A matrices that differ, a partial q/k/v or gate/up target set, modules megatron's LoRA does not
adapt, and PEFT options with no megatron counterpart (DoRA, bias training, modules_to_save, per-module ranks).
"""
from __future__ import annotations

import json
import os

import torch

from mindspeed_lora.checkpoint.hf_writer import SafetensorsWriter, TensorPlan
from mindspeed_lora.checkpoint.lora_layout import (
    LORA_TARGETS,
    LoraCheckpointConfig,
    adapter_rules,
    hf_module_targets,
)
from mindspeed_lora.checkpoint.sources import DictSource, MegatronAsHF, first_of, peft_source
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def is_peft_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def adapter_config(lora: LoraCheckpointConfig, arch: ModelArch, base_model: str | None) -> dict:
    """adapter_config.json for PEFT: target modules under their HF names."""
    hf_targets = sorted({m for ms in hf_module_targets(arch, lora.target_modules).values() for m in ms})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": hf_targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def export_adapter(view: MegatronAsHF, lora: LoraCheckpointConfig, out_dir: str, dtype: torch.dtype | None,
                   base_model: str | None, progress=None) -> None:
    """Write ``view``'s adapter tensors (a LoRA-only view) as a PEFT adapter dir into ``out_dir``."""
    plan, order = [], []
    for pp, rule in view.rules:
        for name in rule.hf_names + rule.copies:
            if view.owns(pp, rule, name):
                plan.append(TensorPlan(name, view.shape(name), dtype or view.dtype(name)))
                order.append(name)
    writer = SafetensorsWriter(out_dir, plan, max_shard_bytes=2**62, single_name=WEIGHTS_NAME)
    for name in order:
        t = view.read(name)
        writer.write(name, t.to(dtype) if dtype else t)
        if progress is not None:
            progress.update(1)
    writer.close()
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora, arch=view.arch, base_model=base_model), f, indent=2, sort_keys=True)
        f.write("\n")


def read_adapter_config(adapter_dir: str, arch: ModelArch) -> LoraCheckpointConfig:
    """The adapter's LoRA config with its HF targets mapped to megatron's fused linears."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert")
    for key, ok, why in (
        ("use_dora", lambda v: not v, "DoRA has a magnitude vector megatron's LoRA does not have"),
        ("bias", lambda v: v in (None, "none"), "trained biases have no place in a megatron LoRA checkpoint"),
        ("modules_to_save", lambda v: not v, "fully trained modules are not adapters"),
        ("rank_pattern", lambda v: not v, "per-module ranks are not supported"),
        ("alpha_pattern", lambda v: not v, "per-module alphas are not supported"),
        ("fan_in_fan_out", lambda v: not v, "transposed (Conv1D) weights do not occur in these models"),
        ("layers_to_transform", lambda v: v is None, "LoRA on some layers only is not supported"),
    ):
        if not ok(cfg.get(key)):
            raise UserError(f"{path}: {key}={cfg.get(key)!r} cannot convert: {why}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise UserError(f"{path}: missing key {key!r}")
    targets = cfg["target_modules"]
    mapping = hf_module_targets(arch, LORA_TARGETS)
    if targets == "all-linear":
        targets = [m for ms in mapping.values() for m in ms]
    if isinstance(targets, str):
        raise UserError(f"{path}: target_modules is the pattern {targets!r}; expected a list of module names")
    hf_targets = {t.rsplit(".", 1)[-1] for t in targets}
    known = {m for ms in mapping.values() for m in ms}
    unknown = sorted(hf_targets - known)
    if unknown:
        raise UserError(f"{path}: target module {unknown[0]!r} does not map to a megatron linear "
                        f"(supported for {arch.family}: {sorted(known)})")
    chosen = []
    for target, modules in mapping.items():
        present = [m for m in modules if m in hf_targets]
        if present and len(present) != len(modules):
            raise UserError(f"{path}: target_modules has {present} but not {sorted(set(modules) - set(present))}: "
                            f"megatron fuses {'/'.join(modules)} into {target}, so adapt all of them or none")
        if present:
            chosen.append(target)
    return LoraCheckpointConfig(r=int(cfg["r"]), alpha=cfg["lora_alpha"], target_modules=tuple(chosen),
                                dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                                use_rslora=bool(cfg.get("use_rslora", False)))


def read_adapter(adapter_dir: str, arch: ModelArch, flags: LoraCheckpointConfig | None
                 ) -> tuple[DictSource, LoraCheckpointConfig]:
    """The adapter's tensors (checked: names, ranks, fusable A copies) and its LoRA config."""
    lora = read_adapter_config(adapter_dir, arch)
    if flags is not None:
        diff = lora.mismatch(flags)
        if diff:
            raise UserError(f"{os.path.join(adapter_dir, CONFIG_NAME)}: the adapter does not match the LoRA "
                            f"flags: {'; '.join(diff)} (adapter vs flags)")
    src = peft_source(adapter_dir)
    rules = adapter_rules(arch, ParallelOptions(), 0, lora.target_modules)
    expected = {n for r in rules.values() for n in r.hf_names + r.copies}
    missing, unknown = sorted(expected - set(src.keys())), sorted(set(src.keys()) - expected)
    if missing:
        raise UserError(f"{src.model_dir}: missing tensor {first_of(missing)} for targets "
                        f"{list(lora.target_modules)}")
    if unknown:
        raise UserError(f"{src.model_dir}: tensor {unknown[0]!r} does not map to a megatron LoRA weight of this "
                        f"{arch.family} model")
    for rule in rules.values():
        first = src.tensors[rule.hf_names[0]]
        if rule.mcore_key.endswith(".lora_A.default.weight") and first.shape[0] != lora.r:
            raise UserError(f"{src.model_dir}: {rule.hf_names[0]} has rank {first.shape[0]}; "
                            f"adapter_config.json says r={lora.r}")
        for copy in rule.copies:
            if not torch.equal(src.tensors[copy], first):
                raise UserError(f"{src.model_dir}: {copy} differs from {rule.hf_names[0]}: megatron's "
                                f"{rule.mcore_key.split('.lora_')[0].rsplit('.', 1)[-1]} has one A shared by "
                                "the fused modules, so their lora_A must be identical (an adapter trained on "
                                "unfused q/k/v or gate/up cannot be converted exactly)")
    return src, lora
