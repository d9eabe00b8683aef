"""DPO losses and reward metrics from sequence log-probabilities.

With policy log-probs pi_c, pi_r and reference log-probs ref_c, ref_r of the chosen and rejected responses
(summed over response tokens), the implicit rewards are r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r)
and z = (pi_c - pi_r) - (ref_c - ref_r):

  sigmoid  -(1 - eps) log sigma(beta z) - eps log sigma(-beta z)      (eps = label smoothing; DPO, cDPO)
  hinge    max(0, 1 - beta z)                                         (SLiC)
  ipo      (z' - 1 / (2 beta))^2, z' computed from per-token MEAN log-probs (IPO, as TRL does)

Reference-free (no reference model, no reference pass), on per-token MEAN log-probs c, r of the policy, with
rewards beta c and beta r (as LLaMA-Factory reports them):

  simpo    -log sigma(beta (c - r) - gamma)                           (SimPO; gamma = --simpo-gamma)
  orpo     -c - beta log sigma(log odds(c) - log odds(r)),  log odds(p) = p - log(1 - e^p)   (ORPO)

An optional SFT term adds ftx * (-mean log-prob of the chosen response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mindspeed_lora.errors import UserError

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    """Strength of the KL penalty towards the reference (--dpo-beta)."""
    loss_type: str = "sigmoid"
    """sigmoid | hinge | ipo | simpo | orpo (--dpo-loss-type)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped, for the sigmoid loss (--dpo-label-smoothing)."""
    pref_ftx: float = 0.0
    """Weight of the SFT loss on the chosen responses (--pref-ftx)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (--simpo-gamma)."""

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--dpo-loss-type {self.loss_type!r}: expected one of {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise UserError(f"--dpo-beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--dpo-label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise UserError("--dpo-label-smoothing applies to --dpo-loss-type sigmoid only")
        if self.pref_ftx < 0:
            raise UserError(f"--pref-ftx must be >= 0, got {self.pref_ftx}")
        if self.simpo_gamma < 0:
            raise UserError(f"--simpo-gamma must be >= 0, got {self.simpo_gamma}")


@dataclass
class SequenceLogps:
    """Per-sequence sums of response-token log-probs and response lengths, shape [n]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps, mask: [n, s] -> (sum of masked log-probs [n], number of masked tokens [n])."""
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp); log(1 - p) as log(-expm1) (exact near p = 1, kept below 0)."""
    return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-6)))


def _reference_free_loss(cfg: DPOConfig, policy: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, r = policy.chosen / policy.chosen_len, policy.rejected / policy.rejected_len
    if cfg.loss_type == "simpo":
        losses = -F.logsigmoid(cfg.beta * (c - r) - cfg.simpo_gamma)
    else:
        losses = -c - cfg.beta * F.logsigmoid(_log_odds(c) - _log_odds(r))
    return losses, cfg.beta * c.detach(), cfg.beta * r.detach()


def dpo_loss(cfg: DPOConfig, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs and the metrics dict (detached scalars); ``reference`` is None for simpo / orpo."""
    if not cfg.needs_reference:
        losses, chosen_rewards, rejected_rewards = _reference_free_loss(cfg, policy)
        if cfg.pref_ftx:
            losses = losses + cfg.pref_ftx * (-policy.chosen / policy.chosen_len)
        return losses.mean(), _metrics(policy, chosen_rewards, rejected_rewards)
    if cfg.loss_type == "ipo":
        pc, pr = policy.chosen / policy.chosen_len, policy.rejected / policy.rejected_len
        rc, rr = reference.chosen / reference.chosen_len, reference.rejected / reference.rejected_len
    else:
        pc, pr, rc, rr = policy.chosen, policy.rejected, reference.chosen, reference.rejected
    z = (pc - pr) - (rc - rr)
    if cfg.loss_type == "sigmoid":
        losses = (-(1 - cfg.label_smoothing) * F.logsigmoid(cfg.beta * z)
                  - cfg.label_smoothing * F.logsigmoid(-cfg.beta * z))
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - cfg.beta * z)
    else:
        losses = (z - 1 / (2 * cfg.beta)) ** 2
    if cfg.pref_ftx:
        losses = losses + cfg.pref_ftx * (-policy.chosen / policy.chosen_len)
    chosen_rewards = cfg.beta * (policy.chosen - reference.chosen).detach()
    rejected_rewards = cfg.beta * (policy.rejected - reference.rejected).detach()
    return losses.mean(), _metrics(policy, chosen_rewards, rejected_rewards)


def _metrics(policy: SequenceLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
    }
