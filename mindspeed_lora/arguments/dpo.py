"""Flags of posttrain_gpt.py --stage dpo (MindSpeed-LLM names) and the typed DPOConfig built from them."""
from __future__ import annotations

import argparse

from mindspeed_lora.dpo.loss import LOSS_TYPES, DPOConfig


def add_dpo_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DPO (--stage dpo; the reference model is --load: with LoRA the same model "
                                  "with its adapters off, with full fine-tuning a frozen copy or --ref-load)")
    g.add_argument("--dpo-beta", type=float, default=0.1,
                   help="strength of the pull towards the reference model (rewards are beta x log-ratio)")
    g.add_argument("--dpo-loss-type", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO), hinge (SLiC), ipo (IPO, on per-token mean log-probs); reference-free, so "
                        "no reference model or pass: simpo (SimPO) or orpo (ORPO, with its own SFT term)")
    g.add_argument("--simpo-gamma", type=float, default=0.5,
                   help="SimPO's target reward margin gamma (LLaMA-Factory's simpo_gamma)")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="probability that a preference label is wrong (conservative DPO); sigmoid loss only")
    g.add_argument("--ref-load", "--ref-model", dest="ref_load", metavar="DIR", default=None,
                   help="full-parameter DPO: the reference model (HF dir or Megatron checkpoint, the run's layout). "
                        "Default: --load on a fresh start; on a resume the reference the checkpoint recorded")
    g.add_argument("--pref-ftx", type=float, default=0.0,
                   help="weight of an SFT term: the mean negative log-prob of the chosen response tokens")


def dpo_config_from_args(args: argparse.Namespace) -> DPOConfig:
    return DPOConfig(beta=args.dpo_beta, loss_type=args.dpo_loss_type, label_smoothing=args.dpo_label_smoothing,
                     pref_ftx=args.pref_ftx, simpo_gamma=args.simpo_gamma)
