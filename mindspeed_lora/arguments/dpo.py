"""Flags of posttrain_gpt.py --stage dpo (MindSpeed-LLM names) and the typed DPOConfig built from them."""
from __future__ import annotations

import argparse

from mindspeed_lora.dpo.loss import LOSS_TYPES, DPOConfig
from mindspeed_lora.errors import UserError


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
    g.add_argument("--simpo-beta", type=float, default=2.5, help="--stage simpo: SimPO's beta")
    g.add_argument("--gamma-beta-ratio", type=float, default=1.4,
                   help="--stage simpo: gamma / beta (the margin is gamma = ratio x --simpo-beta)")
    g.add_argument("--simpo-loss-type", default="sigmoid", choices=["sigmoid", "hinge", "ipo"],
                   help="--stage simpo: only sigmoid (SimPO's loss)")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="probability that a preference label is wrong (conservative DPO); sigmoid loss only")
    g.add_argument("--ref-load", "--ref-model", dest="ref_load", metavar="DIR", default=None,
                   help="full-parameter DPO: the reference model (HF dir or Megatron checkpoint, the run's layout). "
                        "Default: --load on a fresh start; on a resume the reference the checkpoint recorded")
    g.add_argument("--refer-model-iter", type=int, metavar="N", default=None,
                   help="full-parameter DPO: the reference is iteration N of --ref-load, else of --load, on a fresh "
                        "start or a resume (MindSpeed-LLM's flag, 1 by default there: resuming in the directory the "
                        "run started from, the policy reads the latest iteration and the reference the initial one). "
                        "Default: as --ref-load says")
    g.add_argument("--pref-ftx", type=float, default=0.0,
                   help="weight of an SFT term: the mean negative log-prob of the chosen response tokens")


def dpo_config_from_args(args: argparse.Namespace) -> DPOConfig:
    if args.stage == "simpo":
        if args.simpo_loss_type != "sigmoid":
            raise UserError(f"--simpo-loss-type {args.simpo_loss_type}: only sigmoid (SimPO's loss); for hinge or "
                            "ipo use --stage dpo --dpo-loss-type hinge|ipo")
        if args.dpo_loss_type != "sigmoid":
            raise UserError(f"--stage simpo with --dpo-loss-type {args.dpo_loss_type}: --stage simpo is SimPO; "
                            "use --stage dpo to pick another loss")
        return DPOConfig(beta=args.simpo_beta, loss_type="simpo", pref_ftx=args.pref_ftx,
                         simpo_gamma=args.gamma_beta_ratio * args.simpo_beta)
    return DPOConfig(beta=args.dpo_beta, loss_type=args.dpo_loss_type, label_smoothing=args.dpo_label_smoothing,
                     pref_ftx=args.pref_ftx, simpo_gamma=args.simpo_gamma)
