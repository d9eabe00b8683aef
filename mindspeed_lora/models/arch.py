"""The architecture of a model as plain data, read from an HF config.json and saved beside Megatron shards.

``ModelArch`` is what every later step needs to rebuild the model without repeating architecture flags.
It is JSON-serialisable (no pickled objects) and is the only input to ``build_transformer_config``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from mindspeed_lora.errors import UserError
from mindspeed_lora.models.family import family_for_hf_config, get_family

YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1}
"""What HF's YaRN takes for the keys a rope_scaling dict leaves out (the turns bounding the blended dimensions)."""

def _sliding_window(cfg: dict, num_layers: int) -> int | None:
    """The window of an HF config whose layers (some of them) use sliding-window attention, else None."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    if cfg.get("layer_types") is not None:  # transformers >= 4.53 writes each layer's kind
        return int(window) if "sliding_attention" in cfg["layer_types"] else None
    if "use_sliding_window" in cfg:  # Qwen: layers from max_window_layers on, when switched on
        on = cfg["use_sliding_window"] and cfg.get("max_window_layers", 0) < num_layers
        return int(window) if on else None
    return int(window)  # Mistral: every layer


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}: expected one of {sorted(_DTYPES)} (or fp32, bf16, fp16)")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


@dataclass(frozen=True)
class ModelArch:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    torch_dtype: str = "float32"
    rope_scaling: dict | None = field(default=None)
    sliding_window: int | None = None
    """Tokens a sliding-window layer attends to (Mistral v0.1, Qwen with use_sliding_window); None: every
    layer attends to the whole sequence. Windows are not implemented: ``check_context`` refuses longer
    sequences, and up to the window the attention is the same."""

    @property
    def qk_layernorm(self) -> bool:
        return get_family(self.family).qk_layernorm

    @property
    def qkv_bias(self) -> bool:
        return get_family(self.family).qkv_bias

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "architecture") -> "ModelArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise UserError(f"{source}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArch":
        family = family_for_hf_config(cfg, source)

        def need(key):
            if key not in cfg:
                raise UserError(f"{source}: missing key {key!r}")
            return cfg[key]

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            family=family.name,
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=cfg.get("head_dim") or hidden // heads,
            vocab_size=need("vocab_size"),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=str(dtype),
            rope_scaling=rope_scaling,
            sliding_window=_sliding_window(cfg, need("num_hidden_layers")),
        )

    def check_context(self, tokens: int, what: str) -> None:
        """Refuse sequences of more than ``tokens`` where a layer would attend to a sliding window only."""
        if self.sliding_window is not None and tokens > self.sliding_window:
            raise UserError(f"{what} {tokens}: this {self.family} model's layers attend to a sliding window of "
                            f"{self.sliding_window} tokens, which is not implemented here; sequences up to "
                            f"{self.sliding_window} tokens are exact (give at most that)")

    @property
    def rope_kind(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type")) or "default"

    def rope_setting(self, key: str):
        """A rope_scaling value as HF reads it: the config's, else HF's default for this rope type (YaRN's
        beta_fast 32 and beta_slow 1), else None."""
        got = (self.rope_scaling or {}).get(key)
        if got is None and self.rope_kind == "yarn":
            return YARN_DEFAULTS.get(key)
        return got

    def _yarn_factor(self) -> tuple[float, float]:
        """(YaRN's frequency scale s, the pretraining context length L it stretches)."""
        rs = self.rope_scaling
        original = rs.get("original_max_position_embeddings") or self.max_position_embeddings
        factor = rs.get("factor")
        return (factor if factor is not None else self.max_position_embeddings / original), original

    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by: 1, or YaRN's 'attention factor' (its config's, else
        0.1 ln s + 1, as a ratio of two such terms when mscale and mscale_all_dim are given)."""
        if self.rope_kind != "yarn":
            return 1.0
        rs = self.rope_scaling
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        s, _ = self._yarn_factor()

        def term(m: float) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            return term(rs["mscale"]) / term(rs["mscale_all_dim"])
        return term(1.0)

    def rope_inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies with HF semantics (default, linear, llama3, yarn), in fp32, on the CPU."""
        dim = self.kv_channels
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        rs = self.rope_scaling
        if not rs:
            return inv
        kind = self.rope_kind
        if kind == "linear":
            return inv / rs["factor"]
        if kind == "yarn":
            # dimension i keeps its frequency where a wavelength fits many times into the pretraining
            # context (fast rotations, > beta_fast turns), is divided by s where it fits few times (< beta_slow
            # turns), and is blended linearly between those two dimension indices
            s, original = self._yarn_factor()

            def dim_for_turns(turns: float) -> float:
                return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(self.rope_theta))
            lo = dim_for_turns(self.rope_setting("beta_fast"))
            hi = dim_for_turns(self.rope_setting("beta_slow"))
            if rs.get("truncate", True):
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(lo, 0), min(hi, dim - 1)
            if lo == hi:
                hi += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
            return inv / s * ramp + inv * (1 - ramp)
        if kind == "llama3":
            factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
            old_len = rs["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        raise UserError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn)")

    def check_tensor_parallel(self, tp: int, source: str = "--tensor-model-parallel-size") -> None:
        """Refuse a TP size that does not divide the sharded dimensions."""
        for what, n in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups (num_key_value_heads)", self.num_query_groups),
            ("ffn_hidden_size (intermediate_size)", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size),
        ):
            if n % tp:
                raise UserError(f"{source}={tp} does not divide {what}={n}")
