"""Putting LoRA into a megatron GPT model: the layer-spec hook, adapter init, freezing, adapter state dicts.

Typical use (what training and inference do)::

    options = ModelOptions(spec_hooks=[lora_spec_hook(cfg), ...])
    model = build_gpt_model(arch, parallel, options, pre_process=..., post_process=...)
    load base weights ...
    prepare_lora_model(model, seed)      # adapter init by global layer name, base frozen, first-stage input grad
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from mindspeed_lora.errors import UserError
from mindspeed_lora.lora.config import LoraConfig

LORA_KEY_MARKERS = (".lora_A.", ".lora_B.")


def _targets(spec):
    """(owner submodules object, attribute name) of each linear megatron's GPT layer spec can give LoRA."""
    sub = spec.submodules
    attn = getattr(sub.self_attention, "submodules", None)
    mlp = getattr(sub.mlp, "submodules", None)
    return {"linear_qkv": (attn, "linear_qkv"), "linear_proj": (attn, "linear_proj"),
            "linear_fc1": (mlp, "linear_fc1"), "linear_fc2": (mlp, "linear_fc2")}


def lora_spec_hook(cfg: LoraConfig):
    """A ``ModelOptions.spec_hooks`` entry: targeted linears of the local GPT layer spec become LoRA linears."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mindspeed_lora.lora.layers import LORA_CLASSES

    expected = {"linear_qkv": ColumnParallelLinear, "linear_fc1": ColumnParallelLinear,
                "linear_proj": RowParallelLinear, "linear_fc2": RowParallelLinear}

    def hook(spec, arch, config):
        spec = copy.deepcopy(spec)
        targets = _targets(spec)
        for name in cfg.target_modules:
            owner, attr = targets[name]
            current = getattr(owner, attr, None) if owner is not None else None
            cls = current.module if isinstance(current, ModuleSpec) else current
            params = dict(current.params) if isinstance(current, ModuleSpec) else {}
            if not (isinstance(cls, type) and issubclass(cls, expected[name])):
                # e.g. Transformer Engine's fused layernorm-linear: a different module with other state keys
                raise UserError(f"--lora-target-modules {name}: the layer spec holds "
                                f"{getattr(cls, '__name__', cls)!r} there, not megatron's "
                                f"{expected[name].__name__}; LoRA supports megatron's local linears only")
            setattr(owner, attr, ModuleSpec(module=LORA_CLASSES[name], params={**params, "lora_config": cfg}))
        return spec

    return hook


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(global name, module) of every LoRA linear; the global name uses the layer's global index under PP."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from mindspeed_lora.lora.layers import _LoraParallelLinear

    seen = set()
    for layer in model.modules():
        if isinstance(layer, TransformerLayer):
            for rel, mod in layer.named_modules():
                if isinstance(mod, _LoraParallelLinear):
                    seen.add(id(mod))
                    # megatron's layer_number is 1-based and already offset by the pipeline stage
                    yield f"decoder.layers.{layer.layer_number - 1}.{rel}", mod
    for name, mod in model.named_modules():
        if isinstance(mod, _LoraParallelLinear) and id(mod) not in seen:
            yield name, mod


def init_lora_parameters(model: nn.Module, seed: int) -> int:
    """Re-initialise every adapter from (seed, its global name): the same values at any TP/PP layout.

    Returns the number of LoRA linears; none is an error (the spec hook was not applied).
    """
    n = 0
    for name, mod in lora_modules(model):
        mod.reset_lora_parameters(name, seed)
        n += 1
    if n == 0:
        raise UserError("the model has no LoRA linears: build it with lora_spec_hook(cfg) in spec_hooks")
    return n


def is_lora_key(key: str) -> bool:
    return any(m in key for m in LORA_KEY_MARKERS)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A / lora_B weights), in module order."""
    return [p for n, p in model.named_parameters() if is_lora_key(n)]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """requires_grad on adapter params only (embeddings, norms and base linears frozen); returns their count."""
    n = 0
    for name, p in model.named_parameters():
        train = is_lora_key(name)
        p.requires_grad_(train)
        n += p.numel() if train else 0
    if n == 0:
        raise UserError("the model has no LoRA parameters to train")
    return n


def adapter_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The adapter entries of ``model.state_dict()`` (keys ``...lora_A.default.weight`` / ``lora_B``)."""
    return {k: v for k, v in model.state_dict(keep_vars=keep_vars).items() if is_lora_key(k)}


def _input_requires_grad(module, inputs, output):
    if torch.is_tensor(output) and not output.requires_grad and torch.is_grad_enabled():
        return output.detach().requires_grad_()
    return output


def require_embedding_output_grad(model: nn.Module):
    """Make the embedding output require grad on the first pipeline stage; returns the hook handle or None.

    With a frozen base and full recompute, megatron's checkpointed block gets an input that needs no grad,
    so autograd never enters it and the adapters inside get no gradient. An embedding output that requires
    grad restores the path (costs one unused input-grad of the first layer).
    """
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    for mod in model.modules():
        if isinstance(mod, LanguageModelEmbedding):
            return mod.register_forward_hook(_input_requires_grad)
    return None


def prepare_lora_model(model: nn.Module, seed: int):
    """After the base weights are loaded: init adapters from ``seed``, freeze all but them, make the first
    stage's block input require grad. Returns the embedding hook handle (None off the first stage)."""
    init_lora_parameters(model, seed)
    mark_only_lora_trainable(model)
    return require_embedding_output_grad(model)
