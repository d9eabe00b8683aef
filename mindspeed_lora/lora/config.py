"""LoRA settings as one typed, validated dataclass, read from the --lora-* flags or a checkpoint's metadata."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields

from mindspeed_lora.arguments.common import LORA_TARGETS
from mindspeed_lora.errors import UserError

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Which megatron linears get a LoRA adapter, and its shape and scaling."""

    r: int = 16
    """Adapter rank (--lora-r)."""
    alpha: float = 32
    """Scaling numerator (--lora-alpha): scaling = alpha / r, or alpha / sqrt(r) with use_rslora."""
    dropout: float = 0.0
    """Dropout probability on the adapter input (--lora-dropout); 0 adds no op at all."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Megatron linear names (linear_qkv, linear_proj, linear_fc1, linear_fc2) or 'all-linear' for all four;
    stored expanded, in that canonical order."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (--lora-use-rslora)."""
    fusion: bool = False
    """CCLoRA (--lora-fusion): LoRA matmuls overlapped with the tensor-parallel collectives."""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"--lora-r (r): expected a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise UserError(f"--lora-alpha (alpha): expected a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout (dropout): expected a probability in [0, 1), got {self.dropout!r}")
        self.target_modules = expand_targets(self.target_modules)
        if self.fusion and self.dropout > 0:
            raise UserError(f"--lora-fusion (CCLoRA) folds the adapter into the base matmul and cannot apply "
                            f"dropout; got --lora-dropout {self.dropout}. Use --lora-dropout 0 or drop "
                            "--lora-fusion")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "LoRA config") -> LoraConfig:
        """Inverse of ``to_dict``; an unknown key is an error naming ``source`` (e.g. the metadata file)."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected an object with LoRA settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown LoRA keys {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except UserError as e:
            raise UserError(f"{source}: {e}") from e


def expand_targets(targets) -> list[str]:
    """'all-linear' -> the four megatron linears; names checked and put in canonical order, duplicates merged."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise UserError(f"--lora-target-modules (target_modules): expected a non-empty list of "
                        f"{' '.join(LORA_TARGETS)} or {ALL_LINEAR}, got {targets!r}")
    chosen: set[str] = set()
    for name in targets:
        if name == ALL_LINEAR:
            chosen.update(LORA_TARGETS)
        elif name in LORA_TARGETS:
            chosen.add(name)
        else:
            raise UserError(f"--lora-target-modules: unknown module {name!r}; expected megatron linear names "
                            f"{' '.join(LORA_TARGETS)} or {ALL_LINEAR} (HF names like q_proj are not accepted: "
                            "linear_qkv covers q, k and v)")
    return [t for t in LORA_TARGETS if t in chosen]


def lora_config_from_args(args: argparse.Namespace) -> LoraConfig | None:
    """The LoraConfig of the --lora-* flags (arguments.common.add_lora_args); None when no target is given."""
    if not args.lora_target_modules:
        return None
    return LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=list(args.lora_target_modules), use_rslora=args.lora_use_rslora,
                      fusion=args.lora_fusion)
