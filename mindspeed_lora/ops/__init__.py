"""Fused ops, one file each: a plain-torch reference (the spec, run on the CPU), a CUDA and an NPU kernel.

- ``rms_norm.rms_norm``, ``swiglu.swiglu``, ``rope.apply_rotary_emb`` / ``rope.rope_cos_sin``,
  ``attention.attention``, ``cross_entropy.fused_linear_cross_entropy``: the ops;
- ``dispatch``: which implementation runs (``force_impl`` overrides; an unavailable kernel falls back to the
  reference with a logged reason);
- ``spec``: ``FusedOpsConfig`` and ``fused_ops_spec_hook``, which bring the ops into megatron's layer spec
  through the classes in ``layers``; ``triton_kernels``: the CUDA kernels.

Import from the submodules (the op functions share their modules' names, so they are not re-exported here).
Importing an op module imports neither megatron nor triton.
"""
