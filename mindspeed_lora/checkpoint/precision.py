"""Precision test: an HF model and the same weights in megatron-core, fp32, on a fixed probe.

Prints mean and max |logit difference| over the probe's tokens and the number of argmax mismatches; exits
non-zero above the threshold (mean 0.1, as Megatron-SWIFT uses). Runs at TP=1 PP=1 in one process.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch


@dataclass
class PrecisionReport:
    mean_diff: float
    max_diff: float
    argmax_mismatches: int
    tokens: int

    def line(self) -> str:
        return (f"logits vs HF over {self.tokens} tokens: mean |diff| {self.mean_diff:.3e}, "
                f"max |diff| {self.max_diff:.3e}, argmax mismatches {self.argmax_mismatches}")


def probe_ids(vocab_size: int, seq: int = 32, batch: int = 2, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def megatron_model(source, arch):
    """A TP=1, PP=1 fp32 megatron-core model with the weights of ``source`` (any source with HF names: an HF
    reader, or a Megatron checkpoint seen through ``checkpoint.sources.MegatronAsHF``).
    parallel_state must be initialised at TP=PP=1."""
    from mindspeed_lora.checkpoint.weight_map import load_hf_weights
    from mindspeed_lora.models.builder import ParallelOptions, build_gpt_model

    par = ParallelOptions()
    model = build_gpt_model(arch, par, pre_process=True, post_process=True)
    load_hf_weights(model, source, arch, par, 0, 0)
    return model


def megatron_model_from_checkpoint(ckpt, lora=None):
    """A TP=1, PP=1 fp32 megatron-core model holding a Megatron checkpoint of any TP/PP layout (a
    ``checkpoint.sources.MegatronCheckpoint``), joined in megatron's layout without passing through HF names;
    with ``lora`` (its LoRA config and a LoRA ``MegatronCheckpoint``) the adapter is merged in fp32 in that
    layout too. parallel_state must be initialised at TP=PP=1."""
    from mindspeed_lora.checkpoint.lora_layout import adapter_rules
    from mindspeed_lora.checkpoint.lora_merge import merge_delta
    from mindspeed_lora.checkpoint.weight_map import global_layer_key, stage_rules
    from mindspeed_lora.errors import UserError
    from mindspeed_lora.models.builder import ParallelOptions, build_gpt_model, layer_offset

    model = build_gpt_model(ckpt.arch, ParallelOptions(), pre_process=True, post_process=True)
    params = {k.replace(".base_layer.", "."): v for k, v in model.state_dict(keep_vars=True).items()
              if not k.endswith("_extra_state") and ".lora_" not in k}
    filled = set()
    with torch.no_grad():
        for pp in range(ckpt.pp):
            offset = layer_offset(ckpt.arch, ckpt.parallel, pp)
            for key, rule in stage_rules(ckpt.arch, ckpt.parallel, pp).items():
                name = global_layer_key(key, offset)
                if name in params and name not in filled:  # a tied embedding's last-stage copy has no place
                    params[name].copy_(ckpt.tp1_tensor(pp, key, rule.kind))
                    filled.add(name)
        if lora is not None:
            config, lora_ckpt = lora
            for pp in range(lora_ckpt.pp):
                offset = layer_offset(lora_ckpt.arch, lora_ckpt.parallel, pp)
                rules = adapter_rules(lora_ckpt.arch, lora_ckpt.parallel, pp, config.target_modules)
                for key, rule in rules.items():
                    if key.endswith(".lora_A.default.weight"):
                        b_key = key.replace(".lora_A.", ".lora_B.")
                        a = lora_ckpt.tp1_tensor(pp, key, rule.kind)
                        b = lora_ckpt.tp1_tensor(pp, b_key, rules[b_key].kind)
                        w = params[global_layer_key(rule.base_key, offset)]
                        w.copy_(merge_delta(w, a, b, config.scaling, w.dtype))
    if filled != set(params):
        raise UserError(f"{ckpt.path}: no weights for {sorted(set(params) - filled)[:3]}")
    return model


def compare_models(hf_model, mcore_model, vocab_size: int) -> PrecisionReport:
    """Logits of an HF model vs a megatron-core model on the fixed probe, both in fp32."""
    ids = probe_ids(vocab_size)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    hf_model = hf_model.float().eval()
    mcore_model = mcore_model.float().eval()
    with torch.no_grad():
        ours = mcore_model(ids, pos, None).float()
        ref = hf_model(ids).logits.float()
    diff = (ours - ref).abs()
    return PrecisionReport(
        mean_diff=diff.mean().item(), max_diff=diff.max().item(),
        argmax_mismatches=int((ours.argmax(-1) != ref.argmax(-1)).sum()), tokens=ids.numel(),
    )


def compare(hf_dir: str, mcore_model=None, lora_scale_model=None) -> PrecisionReport:
    """Logits of HF transformers (``hf_dir``) vs megatron-core; builds the megatron model from ``hf_dir``
    when ``mcore_model`` is None. parallel_state must be initialised at TP=PP=1."""
    from transformers import AutoModelForCausalLM

    from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.family import read_hf_config

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir), hf_dir)
    if mcore_model is None:
        mcore_model = megatron_model(HFCheckpointReader(hf_dir), arch)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return compare_models(hf, mcore_model, arch.vocab_size)


def main(argv=None) -> None:
    from mindspeed_lora.errors import main_guard
    from mindspeed_lora.parallel import initialize, shutdown

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--threshold", type=float, default=0.1, help="largest allowed mean |logit diff|")
    a = p.parse_args(argv)

    @main_guard
    def run():
        initialize(1, 1)
        report = compare(a.hf_dir)
        print(report.line(), flush=True)
        shutdown()
        if report.mean_diff > a.threshold:
            print(f"FAILED: mean |diff| {report.mean_diff:.3e} > threshold {a.threshold}", file=sys.stderr)
            sys.exit(1)

    run()


if __name__ == "__main__":
    main()
