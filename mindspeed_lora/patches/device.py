"""Patches that move megatron-core's hard-coded CUDA calls to the current accelerator (cpu or npu).

megatron-core calls ``torch.cuda.*`` and builds tensors with ``device="cuda"`` in ~100 places with no
extension point. Rather than patching ``torch`` itself (which would change every library in the
process), each listed megatron module gets its own ``torch`` name bound to a ``DeviceRedirectingTorch``:
identical to ``torch`` except that ``.cuda`` is the accelerator's namespace (``torch.npu`` or a CPU
stand-in) and tensor factories / autocast given ``"cuda"`` use the accelerator's device instead.
"""
from __future__ import annotations

import functools
import types

import torch

from mindspeed_lora.accelerator import Accelerator
from mindspeed_lora.patches.registry import Patch, register

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "as_tensor")


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class DeviceRedirectingTorch(types.ModuleType):
    """``torch`` as seen by one megatron module, with CUDA references pointing at ``accelerator``."""

    def __init__(self, accelerator: Accelerator):
        super().__init__("torch")
        self._accelerator = accelerator
        self.cuda = accelerator.module
        for name in _FACTORIES:
            setattr(self, name, self._redirect_factory(getattr(torch, name)))
        self.autocast = self._redirect_autocast

    def __getattr__(self, name):  # everything not overridden is torch's own
        return getattr(torch, name)

    def _device(self, device):
        if _is_cuda(device):
            return self._accelerator.device()
        if isinstance(device, int):  # megatron passes torch.cuda.current_device() ints on GPU only
            return self._accelerator.device()
        return device

    def _redirect_factory(self, fn):
        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = self._device(kwargs["device"])
            if self._accelerator.device_type == "cpu":
                kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return factory

    def _redirect_autocast(self, device_type, *args, **kwargs):
        if device_type == "cuda":
            device_type = self._accelerator.device_type
        return torch.autocast(device_type, *args, **kwargs)


# The megatron-core 0.16.1 modules on our path (GPT model, TP layers, DDP, optimizer, pipeline schedules)
# that reference torch.cuda or "cuda" devices.
REDIRECTED_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.timers",
    "megatron.core.transformer.module",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.utils",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
)


def _not_cuda(acc: Accelerator) -> bool:
    return acc.device_type != "cuda"


register(
    Patch(
        name="torch-cuda-redirect",
        targets=tuple(f"{m}:torch" for m in REDIRECTED_MODULES),
        reason="megatron-core hard-codes torch.cuda.* and device='cuda'; these modules see the accelerator's "
        "namespace (torch.npu, or a CPU stand-in) through their own 'torch' name, torch itself untouched",
        condition=_not_cuda,
        condition_text="device is npu or cpu",
        build=lambda acc, original: DeviceRedirectingTorch(acc),
    )
)


def _get_rng_state(accelerator: Accelerator):
    def get_state(device="cuda", clone=False, graph_safe=False):
        if graph_safe:
            raise RuntimeError("graph-safe RNG states exist on CUDA only")
        state = accelerator.get_rng_state()
        return state.clone() if clone else state

    return get_state


def _set_rng_state(accelerator: Accelerator):
    def set_state(new_state, device=-1, graph_safe=False):
        if graph_safe:
            raise RuntimeError("graph-safe RNG states exist on CUDA only")
        accelerator.set_rng_state(new_state)

    return set_state


register(
    Patch(
        name="rng-tracker-state",
        targets=("megatron.core.tensor_parallel.random:_get_cuda_rng_state",),
        reason="the model-parallel RNG tracker reads CUDA generator internals (default_generators, _lazy_call); "
        "on cpu/npu it must read the accelerator's generator",
        condition=_not_cuda,
        condition_text="device is npu or cpu",
        build=lambda acc, original: _get_rng_state(acc),
    )
)
register(
    Patch(
        name="rng-tracker-set-state",
        targets=("megatron.core.tensor_parallel.random:_set_cuda_rng_state",),
        reason="pair of rng-tracker-state: the tracker's fork() restores the accelerator's generator",
        condition=_not_cuda,
        condition_text="device is npu or cpu",
        build=lambda acc, original: _set_rng_state(acc),
    )
)


def _setup_embeddings_without_cuda(original):
    def setup_embeddings_and_output_layer(self):
        # megatron syncs the tied embedding of the first and last pipeline stages with
        # `weight.data = weight.data.cuda(); all_reduce(weight.data)`. Run the original with that step
        # disabled (an instance attribute shadows the group test), then do the all-reduce in place.
        import torch.distributed as dist

        sync = dist.is_initialized() and self._is_in_embd_group()
        self._is_in_embd_group = lambda: False
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if sync:
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    return setup_embeddings_and_output_layer


register(
    Patch(
        name="tied-embedding-sync",
        targets=("megatron.core.models.common.language_module.language_module:"
                 "LanguageModule.setup_embeddings_and_output_layer",),
        reason="with tied embeddings and PP>1 megatron moves the shared weight with Tensor.cuda() before "
        "all-reducing it across the first and last stages; on cpu/npu the all-reduce is done in place",
        condition=_not_cuda,
        condition_text="device is npu or cpu",
        build=lambda acc, original: _setup_embeddings_without_cuda(original),
    )
)
