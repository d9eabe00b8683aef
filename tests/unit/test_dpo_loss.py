"""DPO losses vs a scalar, per-pair transcription of the papers' formulas (sigmoid/cDPO, hinge, IPO, SimPO,
ORPO)."""
import math

import pytest
import torch

from mindspeed_lora.dpo.loss import DPOConfig, SequenceLogps, dpo_loss, sequence_logps
from mindspeed_lora.errors import UserError


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(cfg, pol, ref):
    losses, acc, margins = [], [], []
    for i in range(len(pol[0])):
        pc, pr, lc, lr = pol[0][i], pol[1][i], pol[2][i], pol[3][i]
        rc, rr = ref[0][i], ref[1][i]
        if cfg.loss_type in ("simpo", "orpo"):  # reference-free, on mean log-probs; rewards beta * mean
            c, r = pc / lc, pr / lr
            if cfg.loss_type == "simpo":
                loss = -_logsig(cfg.beta * (c - r) - cfg.simpo_gamma)
            else:  # odds p / (1 - p) of p = e^c
                odds_c, odds_r = math.exp(c) / (1 - math.exp(c)), math.exp(r) / (1 - math.exp(r))
                loss = -c - cfg.beta * _logsig(math.log(odds_c) - math.log(odds_r))
            loss += cfg.pref_ftx * (-pc / lc)
            losses.append(loss)
            acc.append(1.0 if c > r else 0.0)
            margins.append(cfg.beta * (c - r))
            continue
        if cfg.loss_type == "ipo":
            z = (pc / lc - pr / lr) - (rc / lc - rr / lr)
            loss = (z - 1 / (2 * cfg.beta)) ** 2
        else:
            z = (pc - pr) - (rc - rr)
            if cfg.loss_type == "sigmoid":
                e = cfg.label_smoothing
                loss = -(1 - e) * _logsig(cfg.beta * z) - e * _logsig(-cfg.beta * z)
            else:
                loss = max(0.0, 1 - cfg.beta * z)
        loss += cfg.pref_ftx * (-pc / lc)
        losses.append(loss)
        cr, rj = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
        acc.append(1.0 if cr > rj else 0.0)
        margins.append(cr - rj)
    n = len(losses)
    return sum(losses) / n, sum(acc) / n, sum(margins) / n


@pytest.mark.parametrize("cfg", [DPOConfig(), DPOConfig(beta=0.5, label_smoothing=0.2), DPOConfig(loss_type="hinge"),
                                 DPOConfig(loss_type="ipo", beta=0.3), DPOConfig(pref_ftx=0.7),
                                 DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.8),
                                 DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.0, pref_ftx=0.3),
                                 DPOConfig(loss_type="orpo", beta=0.1), DPOConfig(loss_type="orpo", beta=0.7)])
def test_loss_and_metrics_match_formula(cfg):
    g = torch.Generator().manual_seed(1)
    pol = [(-20 * torch.rand(6, generator=g, dtype=torch.float64)) for _ in range(2)]
    ref = [(-20 * torch.rand(6, generator=g, dtype=torch.float64)) for _ in range(2)]
    lens = [torch.randint(1, 9, (6,), generator=g).double() for _ in range(2)]
    policy = SequenceLogps(pol[0], pol[1], lens[0], lens[1])
    reference = SequenceLogps(ref[0], ref[1], lens[0], lens[1])
    loss, m = dpo_loss(cfg, policy, reference if cfg.needs_reference else None)
    exp_loss, exp_acc, exp_margin = _expected(cfg, [p.tolist() for p in pol] + [x.tolist() for x in lens],
                                              [r.tolist() for r in ref])
    assert loss.item() == pytest.approx(exp_loss, rel=1e-9)
    assert m["rewards/accuracy"].item() == pytest.approx(exp_acc)
    assert m["rewards/margin"].item() == pytest.approx(exp_margin, rel=1e-9)


def test_sequence_logps_masks_prompt_tokens():
    t = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    m = torch.tensor([[0, 1, 1], [1, 0, 0]])
    s, n = sequence_logps(t, m)
    assert s.tolist() == [-5.0, -4.0] and n.tolist() == [2.0, 1.0]


def test_orpo_stays_finite_where_the_mean_log_prob_reaches_zero():
    one = torch.ones(2, dtype=torch.float64)
    policy = SequenceLogps(torch.tensor([0.0, -1e-9], dtype=torch.float64, requires_grad=True),
                           torch.tensor([-3.0, -2.0], dtype=torch.float64), one, one)
    loss, _ = dpo_loss(DPOConfig(loss_type="orpo"), policy, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.chosen.grad).all()


def test_reference_free_types():
    assert [t for t in ("sigmoid", "hinge", "ipo", "simpo", "orpo") if not DPOConfig(loss_type=t).needs_reference] \
        == ["simpo", "orpo"]


def test_bad_config_is_refused():
    with pytest.raises(UserError, match="--dpo-loss-type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(UserError, match="sigmoid only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(UserError, match="--simpo-gamma must be >= 0"):
        DPOConfig(loss_type="simpo", simpo_gamma=-0.1)
