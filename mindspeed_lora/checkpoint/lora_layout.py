"""Where LoRA adapter tensors live in a Megatron checkpoint and in a PEFT adapter, derived from the weight table.

A LoRA-wrapped megatron linear ``<linear>`` (e.g. ``decoder.layers.0.self_attention.linear_qkv``) stores
``<linear>.lora_A.default.weight`` and ``<linear>.lora_B.default.weight``; its base becomes
``<linear>.base_layer.weight``. Per TP rank (t = TP size)::

    column-parallel base (qkv, gate_up, column):  A [r, in]      the same on every rank    -> kind replicated
                                                  B [out/t, r]   rows in the base's layout -> the base's kind
    row-parallel base (row):                      A [r, in/t]    columns split             -> kind row
                                                  B [out, r]     the same on every rank    -> kind replicated

So each adapter tensor is one more entry of the same table: the shard transforms that move base weights
between HF and megatron move adapters too. On the HF side the names are PEFT's
(``base_model.model.<hf module>.lora_A.weight``); a fused megatron linear (qkv, gate_up) has one A that PEFT
stores once per HF module (q, k and v each get the same A) and a B that splits into the modules' rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mindspeed_lora.arguments.common import LORA_TARGETS
from mindspeed_lora.checkpoint.weight_map import BoundRule, stage_rules
from mindspeed_lora.errors import UserError
from mindspeed_lora.lora.config import expand_targets
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions
from mindspeed_lora.models.family import COLUMN, GATE_UP, QKV, REPLICATED, ROW

PEFT_PREFIX = "base_model.model."
_COLUMN_KINDS = (QKV, GATE_UP, COLUMN)


@dataclass(frozen=True)
class LoraCheckpointConfig:
    """The LoRA settings a checkpoint was trained with (``mindspeed_lora.json`` key ``lora``)."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"LoRA rank r={self.r}: expected >= 1")
        object.__setattr__(self, "target_modules", tuple(expand_targets(self.target_modules)))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_metadata(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "use_rslora": self.use_rslora}

    @classmethod
    def from_metadata(cls, d: dict, source: str) -> "LoraCheckpointConfig":
        missing = [k for k in ("r", "alpha", "target_modules") if k not in d]
        if missing:
            raise UserError(f"{source}: LoRA config lacks {missing}")
        try:
            return cls(r=int(d["r"]), alpha=d["alpha"], target_modules=d["target_modules"],
                       dropout=float(d.get("dropout", 0.0)), use_rslora=bool(d.get("use_rslora", False)))
        except UserError as e:
            raise UserError(f"{source}: {e}") from e

    @classmethod
    def of(cls, obj) -> "LoraCheckpointConfig":
        """From this class, a metadata dict, or any config object with r / alpha / target_modules attributes
        (the training side's LoRA config)."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            return cls.from_metadata(obj, "LoRA config")
        alpha = getattr(obj, "alpha", None)
        if alpha is None:
            alpha = obj.lora_alpha
        return cls(r=int(getattr(obj, "r", None) or obj.lora_r), alpha=alpha,
                   target_modules=tuple(getattr(obj, "target_modules", ())),
                   dropout=float(getattr(obj, "dropout", 0.0) or 0.0),
                   use_rslora=bool(getattr(obj, "use_rslora", False)))

    def mismatch(self, other: "LoraCheckpointConfig") -> list[str]:
        """What differs from ``other`` (rank, alpha, targets, rslora), as 'name self vs other' strings."""
        out = []
        for name in ("r", "alpha", "target_modules", "use_rslora"):
            a, b = getattr(self, name), getattr(other, name)
            if (float(a) != float(b)) if name == "alpha" else a != b:
                out.append(f"{name} {list(a) if isinstance(a, tuple) else a} vs "
                           f"{list(b) if isinstance(b, tuple) else b}")
        return out


def linear_of(base_key: str) -> str:
    """``...linear_qkv.weight`` -> ``...linear_qkv``."""
    return base_key[: -len(".weight")]


def target_of(base_key: str) -> str:
    return linear_of(base_key).rsplit(".", 1)[-1]


def lora_key(linear: str, which: str) -> str:
    return f"{linear}.lora_{which}.default.weight"


def peft_name(hf_weight_name: str, which: str) -> str:
    """PEFT's name of an adapter tensor: ``model.layers.0.self_attn.q_proj.weight``, A ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{PEFT_PREFIX}{hf_weight_name[: -len('.weight')]}.lora_{which}.weight"


@dataclass(frozen=True)
class AdapterRule(BoundRule):
    """A LoRA tensor as a table entry; ``copies`` are further PEFT names that hold the same tensor (the fused
    A of q/k/v or gate/up, stored once per HF module)."""

    copies: tuple[str, ...] = ()
    base_key: str = ""


def adapter_rules(arch: ModelArch, parallel: ParallelOptions, pp_rank: int,
                  targets: tuple[str, ...]) -> dict[str, AdapterRule]:
    """megatron adapter key (stage-local) -> AdapterRule, for the adapted linears of stage ``pp_rank``."""
    out: dict[str, AdapterRule] = {}
    for key, rule in stage_rules(arch, parallel, pp_rank).items():
        if not key.endswith(".weight") or target_of(key) not in targets:
            continue
        linear = linear_of(key)
        a_names = tuple(peft_name(n, "A") for n in rule.hf_names)
        b_names = tuple(peft_name(n, "B") for n in rule.hf_names)
        if rule.kind in _COLUMN_KINDS:
            a = AdapterRule(lora_key(linear, "A"), a_names[:1], REPLICATED, copies=a_names[1:], base_key=key)
            b = AdapterRule(lora_key(linear, "B"), b_names, rule.kind, base_key=key)
        elif rule.kind == ROW:
            a = AdapterRule(lora_key(linear, "A"), a_names, ROW, base_key=key)
            b = AdapterRule(lora_key(linear, "B"), b_names, REPLICATED, base_key=key)
        else:
            raise UserError(f"LoRA on {key} (a {rule.kind} weight) is not supported")
        out[a.mcore_key], out[b.mcore_key] = a, b
    return out


def hf_module_targets(arch: ModelArch, targets: tuple[str, ...]) -> dict[str, list[str]]:
    """megatron target -> the HF module names it covers (``linear_qkv`` -> [q_proj, k_proj, v_proj])."""
    out: dict[str, list[str]] = {}
    for key, rule in stage_rules(arch, ParallelOptions(), 0).items():
        if key.endswith(".weight") and key.startswith("decoder.layers.0.") and target_of(key) in LORA_TARGETS:
            out[target_of(key)] = [n[: -len(".weight")].rsplit(".", 1)[-1] for n in rule.hf_names]
    return {t: out[t] for t in targets}
