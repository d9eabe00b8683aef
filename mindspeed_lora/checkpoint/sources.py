"""Checkpoints as tensor sources with HF names: an HF model dir, a Megatron checkpoint, or tensors in memory.

Every source answers ``name in source``, ``shape(name)``, ``dtype(name)`` and ``read(name, dim, start,
stop)`` (the ``SliceReader`` of ``checkpoint.sharding``), so the same shard transforms write any of them
into Megatron shards, and ``weight_map.load_hf_weights`` loads any of them into a model.
"""
from __future__ import annotations

import os
import re

import torch

from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig, adapter_rules
from mindspeed_lora.checkpoint.sharding import merge_shards
from mindspeed_lora.checkpoint.weight_map import BoundRule, stage_rules
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions
from mindspeed_lora.models.family import GATE_UP, REPLICATED, ROW

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
HF_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
"""HF tensors we drop on purpose: old Llama checkpoints store the rotary inverse frequencies."""


def first_of(names: list[str]) -> str:
    """``'a'`` or ``'a' (and 3 more)``: the first of a sorted list of names, for messages."""
    return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def model_order(keys) -> list[str]:
    """Megatron keys in model order: embedding, then layer by layer (table order inside a layer), then the rest."""
    def rank(key: str):
        if key.startswith("embedding."):
            return (0, 0)
        m = _LAYER.match(key)
        return (1, int(m.group(1))) if m else (2, 0)

    return sorted(keys, key=rank)


def sliced_shape(shape: tuple[int, ...], dim: int | None, start: int, stop: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(shape)
    out = list(shape)
    out[dim] = stop - start
    return tuple(out)


class TensorSource:
    """Base of the sources: ``meta_read`` answers like ``read`` with meta tensors (shapes without bytes)."""

    model_dir: str

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def meta_read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        return torch.empty(sliced_shape(self.shape(name), dim, start, stop), dtype=self.dtype(name), device="meta")


class DictSource(TensorSource):
    """Tensors in memory under HF names (PEFT adapters, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor], model_dir: str = "<memory>"):
        self.tensors = tensors
        self.model_dir = model_dir

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        if name not in self.tensors:
            raise UserError(f"{self.model_dir}: tensor {name!r} not found")
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, stop - start).contiguous()


class HFSource(TensorSource):
    """An HF model dir read slice by slice; its file mappings are dropped every ``remap_bytes`` read.

    safetensors maps each file and hands out views of the mapping, and every page a view touched stays in
    this process's resident set until the mapping closes; re-opening the files now and then keeps the
    resident set near ``remap_bytes`` instead of growing to the model's size.
    """

    def __init__(self, model_dir: str, remap_bytes: int = 256 * 2**20):
        self.model_dir = model_dir
        self.remap_bytes = remap_bytes
        self._reader = HFCheckpointReader(model_dir)
        self._since_open = 0

    def keys(self) -> list[str]:
        return self._reader.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        code = self._reader.dtype_name(name)
        if code not in _ST_DTYPES:
            raise UserError(f"{self.model_dir}: tensor {name!r} has dtype {code}; expected one of {sorted(_ST_DTYPES)}")
        return _ST_DTYPES[code]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        t = self._reader.read(name, dim, start, stop)
        self._since_open += t.numel() * t.element_size()
        if self._since_open >= self.remap_bytes:
            self._reader = HFCheckpointReader(self.model_dir)
            self._since_open = 0
        return t


class MegatronCheckpoint:
    """A Megatron checkpoint dir: written by this project (``mindspeed_lora.json`` beside the shards), or by
    MindSpeed-LLM / Megatron-LM when ``config_dir`` names the HF model it came from (``foreign.describe``).
    Its shards are those of ``iteration``, or of the latest iteration when None."""

    def __init__(self, path: str, what: str = "--load-dir", config_dir: str | None = None,
                 iteration: int | None = None):
        if not os.path.isdir(path):
            raise UserError(f"{what} {path}: no such directory")
        meta = megatron_io.read_metadata(path)
        meta_path = os.path.join(path, megatron_io.METADATA)
        self.foreign_config_dir = None
        if meta is None and config_dir is not None and os.path.isfile(os.path.join(path, megatron_io.LATEST)):
            from mindspeed_lora.checkpoint import foreign

            meta = foreign.describe(path, config_dir, what)
            meta_path = f"{path} (described from {os.path.join(config_dir, 'config.json')})"
            self.foreign_config_dir = config_dir
        if meta is None:
            raise UserError(f"{what} {path}: no {megatron_io.METADATA} (a Megatron checkpoint written by this "
                            "project's convert_ckpt.py or posttrain_gpt.py records the architecture there; for one "
                            "written by MindSpeed-LLM or Megatron-LM, give the HF model it was converted from as "
                            "--hf-cfg-dir)")
        for key in ("arch", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if key not in meta:
                raise UserError(f"{meta_path}: missing key {key!r}")
        self.path = path
        self.what = what
        self.metadata = meta
        self.arch = ModelArch.from_dict(meta["arch"], meta_path)
        pp = int(meta["pipeline_model_parallel_size"])
        self.parallel = ParallelOptions(tensor_model_parallel_size=int(meta["tensor_model_parallel_size"]),
                                        pipeline_model_parallel_size=pp,
                                        num_layer_list=list(meta["num_layer_list"]) if pp > 1 and
                                        meta.get("num_layer_list") else None)
        self.iter_dir = megatron_io.resolve_iteration_dir(path, iteration, what)
        self.iteration = megatron_io.read_latest_iteration(path) if iteration is None else iteration
        self.params_dtype: str | None = meta.get("params_dtype")
        self.lora = LoraCheckpointConfig.from_metadata(meta["lora"], f"{meta_path} key 'lora'") \
            if meta.get("lora") else None
        self._shards: dict[tuple[int, int], megatron_io.ShardReader] = {}
        self._raw_keys: dict[tuple[int, int], dict[str, str]] = {}
        first = self.shard_keys(0, 0)
        self.has_adapter = any(".lora_" in k for k in first)
        self.has_base = any(".lora_" not in k for k in first)

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    @property
    def hf_config_dir(self) -> str | None:
        if self.foreign_config_dir is not None:
            return self.foreign_config_dir
        d = os.path.join(self.path, megatron_io.HF_CONFIG_DIR)
        return d if os.path.isfile(os.path.join(d, "config.json")) else None

    def shard(self, tp_rank: int, pp_rank: int) -> megatron_io.ShardReader:
        key = (tp_rank, pp_rank)
        if key not in self._shards:
            self._shards[key] = megatron_io.ShardReader(
                megatron_io.shard_path(self.iter_dir, tp_rank, pp_rank, self.pp))
        return self._shards[key]

    def shard_keys(self, tp_rank: int, pp_rank: int) -> dict[str, str]:
        """{key with ``.base_layer.`` folded away: key in the file}, without megatron's ``_extra_state``."""
        if (tp_rank, pp_rank) not in self._raw_keys:
            self._raw_keys[(tp_rank, pp_rank)] = {
                k.replace(".base_layer.", "."): k for k in self.shard(tp_rank, pp_rank).keys()
                if not k.endswith("_extra_state")}
        return self._raw_keys[(tp_rank, pp_rank)]

    def read(self, tp_rank: int, pp_rank: int, key: str) -> torch.Tensor:
        keys = self.shard_keys(tp_rank, pp_rank)
        if key not in keys:
            raise UserError(f"{self.shard(tp_rank, pp_rank).path}: no tensor {key!r}")
        return self.shard(tp_rank, pp_rank).read(keys[key])

    def tp1_tensor(self, pp_rank: int, key: str, kind: str) -> torch.Tensor:
        """The TP=1 megatron tensor of ``key`` joined from all TP shards in megatron's own layout.

        The inverse of ``sharding.split_full``, with no HF layout in between: qkv groups and vocab/column rows
        are contiguous per rank, gate_up is [gate_r; up_r] per rank, row-parallel splits columns. The precision
        test builds its megatron model this way, so a wrong HF <-> megatron transform cannot cancel itself.
        """
        shards = [self.read(tp, pp_rank, key) for tp in range(self.tp)]
        if kind == REPLICATED:
            return shards[0]
        if kind == ROW:
            return torch.cat(shards, dim=1)
        if kind == GATE_UP:
            halves = [t.chunk(2, dim=0) for t in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(shards, dim=0)

    def meta(self, tp_rank: int, pp_rank: int, key: str) -> torch.Tensor:
        shard = self.shard(tp_rank, pp_rank)
        raw = self.shard_keys(tp_rank, pp_rank)[key]
        return torch.empty(shard.shape(raw), dtype=shard.dtype(raw), device="meta")

    def adapter_config(self, flags: LoraCheckpointConfig | None) -> LoraCheckpointConfig:
        """The adapter's LoRA config: the checkpoint's, checked against the flags when both exist."""
        where = f"{self.what} {self.path}"
        if self.lora is None and flags is None:
            raise UserError(f"{where}: LoRA checkpoint without a LoRA config in {megatron_io.METADATA}; give "
                            "--lora-r, --lora-alpha and --lora-target-modules it was trained with")
        if self.lora is not None and flags is not None:
            diff = self.lora.mismatch(flags)
            if diff:
                raise UserError(f"{where}: the LoRA checkpoint does not match the LoRA flags: "
                                f"{'; '.join(diff)} (checkpoint vs flags)")
        return self.lora or flags

    def stage_rules(self, pp_rank: int, base: bool, lora: LoraCheckpointConfig | None) -> dict[str, BoundRule]:
        rules: dict[str, BoundRule] = {}
        if base:
            rules.update(stage_rules(self.arch, self.parallel, pp_rank))
        if lora is not None:
            rules.update(adapter_rules(self.arch, self.parallel, pp_rank, lora.target_modules))
        return rules

    def check_keys(self, base: bool, lora: LoraCheckpointConfig | None) -> None:
        """Every shard holds exactly the tensors its stage's table names (adapter keys only where asked)."""
        for pp in range(self.pp):
            rules = self.stage_rules(pp, base, lora)
            for tp in range(self.tp):
                # the other half of a checkpoint holding base and adapter is not asked for: left alone
                keys = {k for k in self.shard_keys(tp, pp)
                        if (base and ".lora_" not in k) or (lora is not None and ".lora_" in k)}
                path = self.shard(tp, pp).path
                missing, unknown = sorted(set(rules) - keys), sorted(keys - set(rules))
                if missing:
                    raise UserError(f"{path}: missing tensor {first_of(missing)}{_adapter_hint(missing, lora)}")
                if unknown:
                    raise UserError(f"{path}: unexpected tensor {first_of(unknown)}{_adapter_hint(unknown, lora)}")
                if lora is not None:
                    for key in rules:
                        if key.endswith(".lora_A.default.weight"):
                            r = self.meta(tp, pp, key).shape[0]
                            if r != lora.r:
                                raise UserError(f"{path}: {key} has rank {r}; the LoRA config says r={lora.r}")


def _adapter_hint(keys: list[str], lora: LoraCheckpointConfig | None) -> str:
    if lora is not None and any(".lora_" in k for k in keys):
        return f" (LoRA targets {list(lora.target_modules)}: do they match the checkpoint?)"
    return ""


class MegatronAsHF(TensorSource):
    """A Megatron checkpoint's tensors under HF names (PEFT names for adapters), merged over TP on demand.

    Reading any HF tensor of a rule merges that rule's TP shards; the merged tensors of the last rule are
    kept, so reading q, k and v of one layer merges its ``linear_qkv`` once.
    """

    def __init__(self, ckpt: MegatronCheckpoint, base: bool = True, lora: LoraCheckpointConfig | None = None):
        self.ckpt = ckpt
        self.model_dir = ckpt.path
        self.arch = ckpt.arch
        self.rules: list[tuple[int, BoundRule]] = []
        """(pp_rank, rule) in model order, over all stages."""
        self._owner: dict[str, tuple[int, BoundRule, int]] = {}
        for pp in range(ckpt.pp):
            rules = ckpt.stage_rules(pp, base, lora)
            for key in model_order(rules):
                rule = rules[key]
                self.rules.append((pp, rule))
                for i, name in enumerate(rule.hf_names + getattr(rule, "copies", ())):
                    # a tied embedding at PP > 1 is stored twice (first and last stage); the first copy serves
                    self._owner.setdefault(name, (pp, rule, min(i, len(rule.hf_names) - 1)))
        self._cache: tuple[tuple[int, str], list[torch.Tensor]] | None = None

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, name: str) -> bool:
        return name in self._owner

    def owns(self, pp_rank: int, rule: BoundRule, name: str) -> bool:
        """Whether ``name`` is served by this (stage, rule) -- false for the second copy of a tied embedding."""
        owner = self._owner[name]
        return owner[0] == pp_rank and owner[1].mcore_key == rule.mcore_key

    def _kw(self) -> dict:
        a = self.arch
        return dict(num_heads=a.num_attention_heads, num_groups=a.num_query_groups, head_dim=a.kv_channels)

    def merged(self, pp_rank: int, rule: BoundRule) -> list[torch.Tensor]:
        """The HF tensors of one rule (rule.hf_names order), from all TP shards of stage ``pp_rank``."""
        ident = (pp_rank, rule.mcore_key)
        if self._cache is not None and self._cache[0] == ident:
            return self._cache[1]
        shards = [self.ckpt.read(tp, pp_rank, rule.mcore_key) for tp in range(self.ckpt.tp)]
        if rule.kind == REPLICATED:
            for tp, s in enumerate(shards[1:], start=1):
                if not torch.equal(s, shards[0]):
                    raise UserError(f"{self.ckpt.shard(tp, pp_rank).path}: {rule.mcore_key} should be the same on "
                                    "every tensor-parallel rank but differs from rank 0's")
        parts = merge_shards(rule.kind, shards, **self._kw())
        self._cache = (ident, parts)
        return parts

    def _meta_parts(self, pp_rank: int, rule: BoundRule) -> list[torch.Tensor]:
        shards = [self.ckpt.meta(tp, pp_rank, rule.mcore_key) for tp in range(self.ckpt.tp)]
        return merge_shards(rule.kind, shards, **self._kw())

    def _lookup(self, name: str) -> tuple[int, BoundRule, int]:
        if name not in self._owner:
            raise UserError(f"{self.model_dir}: no tensor maps to {name!r}")
        return self._owner[name]

    def shape(self, name: str) -> tuple[int, ...]:
        pp, rule, i = self._lookup(name)
        return tuple(self._meta_parts(pp, rule)[i].shape)

    def dtype(self, name: str) -> torch.dtype:
        pp, rule, _ = self._lookup(name)
        return self.ckpt.meta(0, pp, rule.mcore_key).dtype

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        pp, rule, i = self._lookup(name)
        t = self.merged(pp, rule)[i]
        return t if dim is None else t.narrow(dim, start, stop - start).contiguous()


def peft_source(adapter_dir: str) -> DictSource:
    """A PEFT adapter's tensors (``adapter_model.safetensors``) under PEFT names without the adapter name."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        extra = " (adapter_model.bin is not read: it needs pickle; re-save it with safetensors)" \
            if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return DictSource({k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
                       for k, v in tensors.items()}, path)

